"""WebDataset shards: the writer (:mod:`.write`, ImageFolder -> shards), the one tar reader and writer
(:mod:`.tario`), the shard manifests (:mod:`.manifest`) and the one shard reader (:mod:`.stream`)."""

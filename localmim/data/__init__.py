"""Data layer: ImageFolder -> shards (:mod:`.shards`), the one shard reader (:mod:`.stream`) used by pretraining
(:mod:`.pretrain`), fine-tuning / linear probing (:mod:`.classify`) and the view writer (:mod:`.views`); tar
format in :mod:`.tario`, manifests in :mod:`.manifest`; the embedded synthetic datasets in :mod:`.synth`."""

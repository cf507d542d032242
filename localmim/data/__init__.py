"""Data layer: the embedded synthetic datasets (:mod:`.synth`) and WebDataset shards (:mod:`.shards`)."""

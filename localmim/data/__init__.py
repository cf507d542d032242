"""Data layer: ImageFolder -> shards (:mod:`.imagefolder`, :mod:`.shards`), the one shard reader (:mod:`.stream`)
used by pretraining (:mod:`.pretrain`), fine-tuning / linear probing (:mod:`.classify`) and the view writer
(:mod:`.views`); tar format in :mod:`.tario`, manifests in :mod:`.manifest`; ADE20K semantic segmentation
(:mod:`.ade20k`) and COCO detection / instance segmentation (:mod:`.coco`) read in their release layouts; the
embedded synthetic datasets in :mod:`.synth`."""

"""The embedded demo data is learnable: a briefly pre-trained micro encoder, fine-tuned for a few epochs on a
small synth ImageNet (the same generator and shard writer as ``make demo``), beats chance by 2x on val.

What this proves: the fine-tuning path (shards -> loader -> classifier -> loop -> evaluation) learns the labels
of the demo data. What it does NOT prove: that pre-training helps. The demo data's colour prior gives the class
away and the assertion takes the best of 8 epochs, so a random-initialised encoder passes too.
"""

from __future__ import annotations

import pytest
import torch

from localmim import synth
from localmim.config.finetune import FinetuneConfig
from localmim.data.shards.write import ShardOptions, write_shards
from localmim.models.encoder_io import read_encoder
from localmim.train.finetune import FinetuneData, finetune
from tests.classify_data import pretrained_micro_encoder

NUM_CLASSES = 10


def _synth_shards(root, colour_prior: float):
    raw = root / "raw"
    synth.write_imagenet(raw, seed=0, num_classes=NUM_CLASSES, per_class={"train": 30, "val": 10}, min_side=32,
                         max_side=64, quality=90, colour_prior=colour_prior)  # fmt: skip
    opts = ShardOptions(max_samples_per_shard=100, workers=1)
    for split in ("train", "val"):
        write_shards(raw / split, root / "shards" / split, split, opts, progress=False)
    return root / "shards" / "train", root / "shards" / "val"


@pytest.mark.slow
def test_finetune_on_embedded_synth_beats_twice_chance(tmp_path):
    torch.manual_seed(0)
    train, val = _synth_shards(tmp_path, synth.IMAGENET_COLOUR_PRIOR)
    enc = read_encoder(pretrained_micro_encoder(train, tmp_path / "encoder", steps=20))
    # light recipe for tiny data: no mixup/cutmix/RandAugment/erasing (as the embedded params.yaml finetune)
    cfg = FinetuneConfig(epochs=8, warmup_epochs=1, global_batch=16, batch_size=16, lr=2e-3, layer_decay=0.75,
                         mixup=0.0, cutmix=0.0, reprob=0.0, aa=None, num_workers=0, device="cpu")  # fmt: skip
    res = finetune(cfg, enc, FinetuneData(train, val, tmp_path / "ckpt"))
    chance = 100.0 / NUM_CLASSES
    assert res.history[-1]["val_samples"] == 10 * NUM_CLASSES
    assert res.metrics["best_top1"] >= 2 * chance, res.history

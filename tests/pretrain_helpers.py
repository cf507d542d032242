"""Tiny WebDataset train shards (the shard stage's format) for the pretraining tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np


def make_shards(out: Path, n: int = 24, per_shard: int = 5, seed: int = 0, size=(40, 56)) -> list[str]:
    """Write ``n`` random RGB JPEG samples (keys ``000000``.., ``cls``, ``json``) in shards of ``per_shard``,
    plus a ``train.json`` manifest with per-shard counts; returns the keys."""
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, shards = [], []
    for s in range(0, n, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for i in range(s, min(n, s + per_shard)):
                h, wd = int(rng.integers(size[0], size[1])), int(rng.integers(size[0], size[1]))
                arr = rng.integers(0, 256, (h, wd, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=90)
                key = f"{i:06d}"
                w.write({"__key__": key, "jpg": buf.getvalue(), "cls": str(i % 3).encode(), "json": b"{}"})
                keys.append(key)
        shards.append({"name": name, "num_samples": min(n, s + per_shard) - s})
    (out / "train.json").write_text(json.dumps({"classes": ["a", "b", "c"], "shards": shards}))
    return keys


class FixedBatches:
    """A fixed list of uint8 image micro-batches, read the way the pretraining method reads its shard loader
    (batches ``(images, (index, keys))``; one epoch, the same batches every epoch)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def from_step(self, epoch: int, done: int, position=None):
        if done:
            raise ValueError("FixedBatches: one epoch from its start only")
        return iter([(b, None) for b in self.batches])


def run_fixed(cfg, batches, ckpt_dir, *, sgd: bool = False, monitor=None):
    """Pre-train ``cfg`` on a fixed list of micro-batches (one process) through the real loop: the model and its
    init from ``build_engine``; ``sgd``: plain SGD instead of AdamW (the lr set by the schedule); ``ckpt_dir`` None:
    no checkpoints. Returns the loop's result."""
    import torch

    from localmim.runtime.distributed import DistInfo
    from localmim.train import loop
    from localmim.train.engine import Checkpoints
    from localmim.train.pretrain import PretrainMethod, build_engine, plan_of
    from localmim.train.schedule import WarmupCosine

    dist = DistInfo(0, 1, 0, torch.device(cfg.device if cfg.device != "auto" else "cpu", 0 if cfg.device == "cuda"
                                          else None))
    eng = build_engine(cfg, dist)
    if sgd:
        eng.opt = torch.optim.SGD(eng.model.parameters(), lr=0.0)
    loader = FixedBatches(batches)
    plan = plan_of(cfg, len(loader) // cfg.accum_for(1), 1, eng.model.loss_names, progress=False)
    ckpts = Checkpoints.of(ckpt_dir, "pretrain", cfg, dist) if ckpt_dir is not None else None
    schedule = WarmupCosine(eng.opt, cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    return loop.run(PretrainMethod(cfg, eng, loader, monitor), eng, schedule, plan, ckpts=ckpts)

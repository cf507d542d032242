"""Activation (gradient) checkpointing: bytes kept for the backward pass, with and without (``grad_checkpointing``).

ViT-B/16 at 224, batch 8, fp32 on CPU, training mode: the LocalMIM pre-training model (mask ratio 0.75, HOG targets
computed in the forward) and the fine-tuning classifier (``build_classifier`` from its exported encoder, 1000
classes, drop path 0.1). One forward is measured: every tensor autograd saves for the backward passes through a
``torch.autograd.graph.saved_tensors_hooks`` pack hook, and every tensor handed to ``torch.utils.checkpoint`` (the
inputs a checkpointed block keeps for its recomputation; they are held outside the saved-tensor mechanism) is
recorded too. The bytes are those of the distinct storages behind them, parameters and buffers excluded: the
activations the backward needs. One fwd+bwd step is also timed in CPU seconds (process time, robust to a shared
machine; best of ``--iters`` after a warm-up): the price is one extra forward of the checkpointed blocks.

Usage: ``python benchmarks/bench_grad_ckpt.py [--json out.json] [--threads 2] [--iters 1] [--batch 8]``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tc

from localmim.models import create
from localmim.models.common import set_grad_checkpointing
from localmim.models.encoder_io import EncoderSpec, build_classifier
from localmim.models.export import export_encoder


@contextmanager
def _record_checkpoint_inputs(kept: list[torch.Tensor]):
    """Record the tensor arguments of every ``torch.utils.checkpoint.checkpoint`` call (timm's wrappers and ours
    look the function up at call time)."""
    original = tc.checkpoint

    def recording(function, *args, **kwargs):
        kept.extend(a for a in args if isinstance(a, torch.Tensor))
        return original(function, *args, **kwargs)

    tc.checkpoint = recording
    try:
        yield
    finally:
        tc.checkpoint = original


def saved_bytes(model: torch.nn.Module, forward) -> tuple[int, int]:
    """(activation bytes kept for the backward of one ``forward()``, number of distinct storages)."""
    kept: list[torch.Tensor] = []  # strong references: no storage is freed (and its address reused) while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _record_checkpoint_inputs(kept):
        forward()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    acts = {ptr: n for ptr, n in storages.items() if ptr not in weights}
    return sum(acts.values()), len(acts)


def step_seconds(model: torch.nn.Module, forward, iters: int) -> float:
    """Best CPU time (process time, all threads) of one forward + backward (after one warm-up step)."""
    times = []
    for i in range(iters + 1):
        t = time.process_time()
        forward().backward()
        if i:
            times.append(time.process_time() - t)
        model.zero_grad(set_to_none=True)
    return min(times)


def measure(name: str, model: torch.nn.Module, forward, iters: int) -> dict:
    row = {"model": name}
    for ckpt in (False, True):
        set_grad_checkpointing(model, ckpt)
        torch.manual_seed(0)
        nbytes, count = saved_bytes(model, forward)
        key = "ckpt" if ckpt else "plain"
        row[f"{key}_bytes"], row[f"{key}_storages"] = nbytes, count
        row[f"{key}_step_s"] = step_seconds(model, forward, iters) if iters else None
    row["ratio"] = row["plain_bytes"] / row["ckpt_bytes"]
    return row


def vit_b_rows(batch: int, iters: int) -> list[dict]:
    """The LocalMIM ViT-B/16 pre-training model and its fine-tuning classifier at 224."""
    torch.manual_seed(0)
    pretrain = create("localmim_vit_base_patch16").train()
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    classifier = build_classifier(EncoderSpec(*export_encoder(pretrain)), 1000, drop_path=0.1).train()
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    return [measure("LocalMIM ViT-B/16 pre-training (mask 0.75)", pretrain,
                    lambda: pretrain(images, mask_ratio=0.75)[0], iters),
            measure(f"fine-tuning classifier ({classifier.default_cfg.get('architecture', 'vit')})", classifier,
                    lambda: F.cross_entropy(classifier(x), y), iters)]


def _pretrain_row(name: str, label: str, batch: int) -> dict:
    torch.manual_seed(0)
    model = create(name).train()
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    return measure(label, model, lambda: model(images, mask_ratio=0.75)[0], 0)


def _vitdet_row(batch: int) -> dict:
    from localmim.models.detection import DetectionBackbone

    torch.manual_seed(0)
    enc = EncoderSpec(*export_encoder(create("localmim_vit_base_patch16")))
    det = DetectionBackbone(enc, 1024, drop_path=0.1, window_size=14).train()
    images = torch.randn(batch, 3, 1024, 1024)
    return measure("ViTDet backbone, ViT-B/16 at 1024 px", det, lambda: det(images), 0)


def scale_rows(batch: int) -> list[dict]:
    """Bytes only, the paper-scale models: LocalMIM ViT-L/16 pre-training at 224 (mask 0.75) and the ViTDet backbone
    (ViT-B/16, 14x14 windows, blocks 2/5/8/11 global, simple feature pyramid) at 1024 px."""
    return [_pretrain_row("localmim_vit_large_patch16", "LocalMIM ViT-L/16 pre-training (mask 0.75)", batch),
            _vitdet_row(batch)]


def _table(rows: list[dict], per: int = 1) -> None:
    print("| model | without | with `grad_checkpointing` | less | fwd+bwd CPU s without / with |")
    print("|---|---|---|---|---|")
    for r in rows:
        t = f"{r['plain_step_s']:.2f} / {r['ckpt_step_s']:.2f}" if r["plain_step_s"] is not None else "-"
        print(f"| {r['model']} | {r['plain_bytes'] / per / 2**20:.0f} MiB | {r['ckpt_bytes'] / per / 2**20:.0f} MiB | "
              f"{r['ratio']:.1f}x | {t} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=1, help="timed fwd+bwd steps per setting (0: bytes only)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-scale", action="store_true", help="skip the ViT-L and 1024-px ViTDet rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = vit_b_rows(args.batch, args.iters)
    print(f"Activation bytes kept for the backward of one forward (saved tensors + checkpointed blocks' inputs, "
          f"distinct storages, weights excluded), ViT-B/16 at 224, batch {args.batch}, fp32, CPU "
          f"({args.threads} threads); fwd+bwd CPU time (process time, seconds) best of {args.iters} after a "
          "warm-up.\n")
    _table(rows)
    scale = [] if args.no_scale else scale_rows(2)
    if scale:
        print("\nPaper-scale models, bytes per image (batch 2, fp32, not timed; "
              "`configs/imagenet_vit_large.yaml` runs 128 images per GPU, `configs/coco_vit_base.yaml` 8):\n")
        _table(scale, per=2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "threads": args.threads, "rows": rows, "scale_batch": 2,
                       "scale_rows": scale}, f, indent=2)


if __name__ == "__main__":
    main()

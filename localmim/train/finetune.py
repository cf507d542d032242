"""Fine-tuning (SPEC §8): a standard timm classifier initialised from the exported LocalMIM encoder.

Recipe: AdamW (0.9, 0.999) with layer-wise lr decay (timm's ``param_groups_layer_decay``), per-iteration
warm-up + cosine schedule, timm Mixup/CutMix with label smoothing folded into soft targets and
``SoftTargetCrossEntropy``, drop path, global average pooling of the patch tokens -> LayerNorm -> head
(timm ``global_pool='avg'``), head weight trunc-normal std 2e-5. bf16 autocast on CUDA, fp32 on CPU. No
gradient clipping, no EMA. Top-1/top-5 on the val shards after every epoch; resumable checkpoints every
``ckpt_every`` epochs; the best and the last weights are kept as plain timm state dicts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from localmim.models.encoder_io import EncoderSpec, build_classifier
from localmim.models.layer_decay import layer_decay_groups
from localmim.train import checkpoint as ckpt
from localmim.train.schedule import WarmupCosine
from localmim.utils.distributed import DistInfo, init_distributed, unwrap

LogFn = Callable[[dict[str, float], int], None]


def build_mixup(cfg, num_classes: int):
    """(mixup_fn or None, train criterion) of SPEC §8: Mixup/CutMix + smoothing -> soft-target CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                   switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                   num_classes=num_classes)
        return fn, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def train_one_epoch(
    model, loader, optimizer, schedule: WarmupCosine, criterion, mixup_fn, *, epoch: int, steps: int,
    accum_iter: int, device: torch.device, amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """One epoch of ``steps`` batches; returns the on-device sum of per-batch losses (no host sync here).

    The lr is set at the start of each accumulation cycle; the loss is divided by ``accum_iter``;
    under DDP, gradient all-reduce happens only on the last micro-batch of a cycle.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    optimizer.zero_grad(set_to_none=True)
    for it, (images, labels) in enumerate(loader):
        if it >= steps:
            break
        if it % accum_iter == 0:
            schedule.apply(optimizer, epoch + it / steps)
        images = images.to(device, non_blocking=True)  # [B, 3, S, S]
        labels = labels.to(device, non_blocking=True)  # [B]
        if mixup_fn is not None:
            images, labels = mixup_fn(images, labels)  # labels -> soft targets [B, C]
        step_now = (it + 1) % accum_iter == 0 or it + 1 == steps
        sync = step_now or not hasattr(model, "no_sync")
        with (torch.enable_grad() if sync else model.no_sync()):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = criterion(model(images), labels)
            (loss / accum_iter).backward()
        if step_now:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
    return loss_sum


@dataclass
class FinetuneResult:
    top1: float
    top5: float
    best_top1: float
    best_epoch: int
    epochs: int
    seconds: float
    history: list[dict[str, float]]


def finetune(
    cfg,
    enc: EncoderSpec,
    *,
    train_dir: str | Path,
    val_dir: str | Path,
    out_dir: str | Path,
    ckpt_dir: str | Path,
    num_classes: int | None = None,
    log_fn: LogFn | None = None,
    dist: DistInfo | None = None,
) -> FinetuneResult:
    """Fine-tune ``enc`` on ``train_dir`` and evaluate on ``val_dir`` every epoch (see module docstring).

    Writes ``out_dir/best.pt`` and ``out_dir/last.pt`` (plain timm state dicts) and ``out_dir/model.json``
    (timm name + kwargs). Resumes from the newest checkpoint in ``ckpt_dir`` when its params match ``cfg``.
    """
    from localmim.data.classify import ClassifyShards, build_transform, make_loader, num_classes_of
    from localmim.eval.classify import evaluate
    from localmim.train.optim import create_adamw

    t0 = time.time()
    dist = dist or init_distributed(cfg.device)
    dev = dist.device
    _seed_everything(cfg.seed + dist.rank)
    num_classes = num_classes or num_classes_of(train_dir)
    if not num_classes:
        raise ValueError(f"{train_dir}: class count unknown (no manifest 'classes'); pass num_classes")
    size = cfg.input_size or enc.img_size
    model = build_classifier(enc, num_classes, model=cfg.model, drop_path=cfg.drop_path, input_size=size).to(dev)
    optimizer = create_adamw(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=0.0,
                             weight_decay=cfg.weight_decay, betas=(0.9, 0.999), device=dev)
    train_ds = ClassifyShards(train_dir, build_transform(size, train=True, aa=cfg.aa, reprob=cfg.reprob,
                                                         remode=cfg.remode, recount=cfg.recount),
                              batch_size=cfg.batch_size, train=True, rank=dist.rank, world=dist.world_size,
                              seed=cfg.seed)
    val_ds = ClassifyShards(val_dir, build_transform(size, train=False), batch_size=cfg.batch_size, train=False,
                            rank=dist.rank, world=dist.world_size)
    steps = len(train_ds)
    schedule = WarmupCosine(cfg.peak_lr(dist.world_size), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    mixup_fn, criterion = build_mixup(cfg, num_classes)
    params = {"finetune": cfg.to_dict(), "encoder": _sd_fingerprint(enc.state_dict)}
    state = _resume(ckpt_dir, params, model, optimizer, dist)
    prior_seconds = state["seconds"]
    ddp = model
    if dist.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    pin = dev.type == "cuda"
    for epoch in range(state["epoch"], cfg.epochs):
        train_ds.set_epoch(epoch)
        loss_sum = train_one_epoch(ddp, make_loader(train_ds, cfg.num_workers, pin), optimizer, schedule,
                                   criterion, mixup_fn, epoch=epoch, steps=steps, accum_iter=cfg.accum_iter,
                                   device=dev, amp_dtype=amp)
        train_loss = loss_sum.item() / steps  # one host sync per epoch
        if not math.isfinite(train_loss):
            last_good = f"; last good checkpoint in {ckpt_dir}" if ckpt.find_latest(ckpt_dir) else ""
            raise FloatingPointError(f"finetune: non-finite training loss in epoch {epoch + 1}{last_good}")
        ev = evaluate(model, make_loader(val_ds, cfg.num_workers, pin), dev, amp)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": schedule(epoch + 1), "top1": ev["top1"],
               "top5": ev["top5"], "val_loss": ev["loss"], "val_samples": ev["n"]}
        state["history"].append(row)
        if ev["top1"] > state["best_top1"]:
            state["best_top1"], state["best_epoch"] = ev["top1"], epoch + 1
            if dist.is_main:
                _save_weights(model, Path(ckpt_dir) / "best.pt")
        if log_fn is not None and dist.is_main:
            log_fn({k: v for k, v in row.items() if k != "epoch"} | {"best_top1": state["best_top1"]}, epoch + 1)
        state["seconds"] = prior_seconds + time.time() - t0
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            _checkpoint(ckpt_dir, model, optimizer, epoch + 1, (epoch + 1) * steps, params, state, dist)
    return _finish(model, enc, cfg, out_dir, ckpt_dir, state, dist, prior_seconds + time.time() - t0)


def _seed_everything(seed: int) -> None:
    """torch (init, drop path, worker seeds -> RandAugment/erasing), NumPy (timm Mixup) and Python RNGs."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _sd_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """Cheap identity of the encoder weights (resume only onto the same encoder)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().float().flatten()
        h.update(k.encode())
        h.update(f"{t.numel()}:{t.sum().item():.6e}:{t.abs().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


def _resume(ckpt_dir, params, model, optimizer, dist: DistInfo) -> dict[str, Any]:
    """Restore the newest checkpoint made with the same params and encoder; else a fresh state."""
    fresh = {"epoch": 0, "best_top1": -1.0, "best_epoch": 0, "history": [], "seconds": 0.0}
    path = ckpt.find_latest(ckpt_dir)
    if path is None:
        return fresh
    payload = ckpt.load(path, map_location=dist.device)
    if payload["params"] != params:
        print(f"finetune: {path} was made with other params or another encoder; starting from scratch")
        if dist.is_main:  # stale files would otherwise shadow (higher step) or mix with the new run's
            for p in [*ckpt.list_checkpoints(ckpt_dir), Path(ckpt_dir) / "best.pt", Path(ckpt_dir) / "last.pt"]:
                p.unlink(missing_ok=True)
        return fresh
    ckpt.restore(payload, model, optimizer, rank=dist.rank, world_size=dist.world_size)
    state = dict(payload["extra"])
    state["epoch"] = payload["epoch"]
    print(f"finetune: resumed from {path} (epoch {state['epoch']}, best top-1 {state['best_top1']:.2f})")
    return state


def _checkpoint(ckpt_dir, model, optimizer, epoch, step, params, state, dist: DistInfo) -> None:
    rng = ckpt.all_rng_states()  # collective
    if dist.is_main:
        extra = {k: v for k, v in state.items() if k != "epoch"}
        payload = ckpt.make_payload(model=unwrap(model), optimizer=optimizer, scaler=None, epoch=epoch, step=step,
                                    data_batches=0, rng=rng, params=params, extra=extra)
        ckpt.save(ckpt_dir, payload)
        _save_weights(model, Path(ckpt_dir) / "last.pt")


def _save_weights(model, path: Path) -> None:
    from localmim.utils.io import atomic_torch_save

    atomic_torch_save({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)


def _finish(model, enc, cfg, out_dir, ckpt_dir, state, dist: DistInfo, seconds: float) -> FinetuneResult:
    """Copy best/last weights to ``out_dir`` (plain timm state dicts) with the model recipe."""
    import shutil

    from localmim.utils.io import atomic_write_json

    last = state["history"][-1]
    if dist.is_main:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "last.pt"):
            shutil.copyfile(Path(ckpt_dir) / name, out / f".{name}.tmp")
            (out / f".{name}.tmp").replace(out / name)
        m = unwrap(model)
        kwargs = dict(enc.timm_kwargs) | {"img_size": cfg.input_size or enc.img_size, "global_pool": "avg",
                                         "num_classes": m.num_classes}
        name = enc.timm_name if cfg.model == "auto" else cfg.model
        atomic_write_json(out / "model.json", {"timm_name": name, "timm_kwargs": kwargs,
                                               "best_epoch": state["best_epoch"], "best_top1": state["best_top1"]})
    return FinetuneResult(last["top1"], last["top5"], state["best_top1"], state["best_epoch"], len(state["history"]),
                          seconds, state["history"])

"""Fine-tuning (method §8): a standard timm classifier initialised from the exported LocalMIM encoder.

Recipe: AdamW (0.9, 0.999) with layer-wise lr decay (``models.layer_decay``), per-iteration warm-up + cosine
schedule, timm Mixup/CutMix with label smoothing folded into soft targets and ``SoftTargetCrossEntropy``, drop path,
global average pooling (ViT: patch tokens -> fresh LayerNorm -> head; Swin: all tokens -> fresh LayerNorm -> head),
head weight trunc-normal std 2e-5. Autocast per ``amp`` (``utils.distributed.amp_dtype``: bf16 on CUDA where
supported, else fp16 with a GradScaler whose state is checkpointed; fp32 on CPU). No gradient clipping, no EMA.
Top-1/top-5 on the val shards after every epoch; resumable checkpoints every ``ckpt_every`` epochs; the best and
the last weights are kept in ``ckpt_dir`` as plain timm state dicts (the stage copies them to its outputs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from localmim.models.encoder_io import EncoderSpec, build_classifier, classifier_head
from localmim.models.layer_decay import layer_decay_groups
from localmim.train import checkpoint as ckpt
from localmim.train.schedule import WarmupCosine, cycle_length
from localmim.utils.distributed import DistInfo, amp_dtype, init_distributed, make_scaler, unwrap

LogFn = Callable[[dict[str, float], int], None]


def build_mixup(cfg, num_classes: int):
    """(mixup_fn or None, train criterion) of method §8: Mixup/CutMix + smoothing -> soft-target CE."""
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
    accum_iter: int, device: torch.device, amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One epoch of ``steps`` batches; returns the on-device sum of per-batch losses (no host sync here).

    The lr is set at the start of each accumulation cycle; the loss is divided by the cycle's micro-batch count
    (``accum_iter``, fewer in a short last cycle), so ``accum_iter=k, batch b`` steps like ``accum_iter=1, batch
    k*b``; backward runs outside autocast; under DDP, gradients are all-reduced only on a cycle's last micro-batch.
    """
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
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
        with torch.enable_grad() if sync else model.no_sync():
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = criterion(model(images), labels)
            scaler.scale(loss / cycle_length(it, accum_iter, steps)).backward()
        if step_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
    return loss_sum


@dataclass
class FinetuneData:
    """What fine-tuning reads and where it keeps its state: train/val shard directories, the checkpoint directory
    (resumable checkpoints plus ``best.pt`` / ``last.pt``), and the class count (None: the train manifest's)."""

    train_dir: str | Path
    val_dir: str | Path
    ckpt_dir: str | Path
    num_classes: int | None = None


@dataclass
class FinetuneResult:
    top1: float
    top5: float
    best_top1: float
    best_epoch: int
    epochs: int
    seconds: float
    history: list[dict[str, float]]
    recipe: dict[str, Any] = field(default_factory=dict)  # model.json: timm_name, timm_kwargs, best epoch/top-1


@dataclass
class _Parts:
    """Everything one fine-tuning run trains with."""

    model: torch.nn.Module  # bare classifier (state dicts, evaluation)
    net: torch.nn.Module  # what the loop calls (DDP wrapper under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    schedule: WarmupCosine
    train_ds: Any
    val_ds: Any
    mixup_fn: Any
    criterion: Any
    params: dict[str, Any]  # what a resume must match


def finetune(cfg, enc: EncoderSpec, data: FinetuneData, *, log_fn: LogFn | None = None,
             dist: DistInfo | None = None) -> FinetuneResult:
    """Fine-tune ``enc`` on ``data.train_dir`` and evaluate on ``data.val_dir`` every epoch (module docstring).

    Keeps ``best.pt`` / ``last.pt`` (plain timm state dicts) in ``data.ckpt_dir`` and resumes from the newest
    checkpoint there when its params and encoder match; the result's ``recipe`` says how to rebuild the model.
    """
    from localmim.data.classify import make_loader

    t0 = time.time()
    dist = dist or init_distributed(cfg.device)
    _seed_everything(cfg.seed + dist.rank)
    p = _build(cfg, enc, data, dist)
    state = _resume(data.ckpt_dir, p, dist)
    prior_seconds, steps, pin = state["seconds"], len(p.train_ds), dist.device.type == "cuda"
    for epoch in range(state["epoch"], cfg.epochs):
        p.train_ds.set_epoch(epoch)
        loss_sum = train_one_epoch(p.net, make_loader(p.train_ds, cfg.num_workers, pin), p.optimizer, p.schedule,
                                   p.criterion, p.mixup_fn, epoch=epoch, steps=steps, accum_iter=cfg.accum_iter,
                                   device=dist.device, amp_dtype=p.amp, scaler=p.scaler)
        _end_epoch(cfg, p, state, epoch, loss_sum.item() / steps, data.ckpt_dir, dist, log_fn)  # one sync per epoch
        state["seconds"] = prior_seconds + time.time() - t0
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            _checkpoint(data.ckpt_dir, p, epoch + 1, (epoch + 1) * steps, state, dist)
    last = state["history"][-1]
    return FinetuneResult(last["top1"], last["top5"], state["best_top1"], state["best_epoch"], len(state["history"]),
                          prior_seconds + time.time() - t0, state["history"], _recipe(p.model, enc, cfg, state))


def _build(cfg, enc: EncoderSpec, data: FinetuneData, dist: DistInfo) -> _Parts:
    from localmim.data.classify import ClassifyShards, build_transform, num_classes_of
    from localmim.train.optim import create_adamw

    dev = dist.device
    num_classes = data.num_classes or num_classes_of(data.train_dir)
    if not num_classes:
        raise ValueError(f"{data.train_dir}: class count unknown (no manifest 'classes'); pass num_classes")
    size = cfg.input_size or enc.img_size
    model = build_classifier(enc, num_classes, model=cfg.model, drop_path=cfg.drop_path, input_size=size).to(dev)
    optimizer = create_adamw(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=0.0,
                             weight_decay=cfg.weight_decay, betas=(0.9, 0.999), device=dev)
    tf = build_transform(size, train=True, aa=cfg.aa, reprob=cfg.reprob, remode=cfg.remode, recount=cfg.recount)
    train_ds = ClassifyShards(data.train_dir, tf, batch_size=cfg.batch_size, train=True, rank=dist.rank,
                              world=dist.world_size, seed=cfg.seed)
    val_ds = ClassifyShards(data.val_dir, build_transform(size, train=False), batch_size=cfg.batch_size,
                            train=False, rank=dist.rank, world=dist.world_size)
    net = model
    if dist.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    dtype = amp_dtype(cfg.amp, dev)
    schedule = WarmupCosine(cfg.peak_lr(dist.world_size), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    params = {"finetune": cfg.to_dict(), "encoder": _sd_fingerprint(enc.state_dict)}
    return _Parts(model, net, optimizer, make_scaler(dev, dtype), dtype, schedule, train_ds, val_ds,
                  *build_mixup(cfg, num_classes), params)


def _end_epoch(cfg, p: _Parts, state: dict, epoch: int, train_loss: float, ckpt_dir, dist: DistInfo,
               log_fn: LogFn | None) -> None:
    """Stop on a non-finite loss; evaluate; keep the best weights; log the epoch's row."""
    from localmim.data.classify import make_loader
    from localmim.eval.classify import evaluate

    if not math.isfinite(train_loss):
        last_good = f"; last good checkpoint in {ckpt_dir}" if ckpt.find_latest(ckpt_dir) else ""
        raise FloatingPointError(f"finetune: non-finite training loss in epoch {epoch + 1}{last_good}")
    loader = make_loader(p.val_ds, cfg.num_workers, dist.device.type == "cuda")
    ev = evaluate(p.model, loader, dist.device, p.amp, num_classes=unwrap(p.model).num_classes)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": p.schedule(epoch + 1), "top1": ev["top1"],
           "top5": ev["top5"], "val_loss": ev["loss"], "val_samples": ev["n"]}
    state["history"].append(row)
    if ev["top1"] > state["best_top1"]:
        state["best_top1"], state["best_epoch"] = ev["top1"], epoch + 1
        if dist.is_main:
            _save_weights(p.model, Path(ckpt_dir) / "best.pt")
    if log_fn is not None and dist.is_main:
        log_fn({k: v for k, v in row.items() if k != "epoch"} | {"best_top1": state["best_top1"]}, epoch + 1)


def _recipe(model, enc: EncoderSpec, cfg, state: dict) -> dict[str, Any]:
    """How to rebuild the classifier: ``encoder_io.create_timm_model(timm_name, head, **timm_kwargs)`` (plain timm
    for ``head == 'timm'``; Swin's ``pool_norm`` head swaps timm's per-token norm for a pooled one, method §8.2)."""
    kwargs = dict(enc.timm_kwargs) | {"img_size": cfg.input_size or enc.img_size, "global_pool": "avg",
                                     "num_classes": unwrap(model).num_classes}
    name = enc.timm_name if cfg.model == "auto" else cfg.model
    return {"timm_name": name, "head": classifier_head(name), "timm_kwargs": kwargs, "best_epoch": state["best_epoch"],
            "best_top1": state["best_top1"]}


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


def _resume(ckpt_dir, p: _Parts, dist: DistInfo) -> dict[str, Any]:
    """Restore the newest checkpoint made with the same params and encoder; else a fresh state."""
    fresh = {"epoch": 0, "best_top1": -1.0, "best_epoch": 0, "history": [], "seconds": 0.0}
    path = ckpt.find_latest(ckpt_dir)
    if path is None:
        return fresh
    payload = ckpt.load(path, map_location=dist.device)
    if payload["params"] != p.params:
        print(f"finetune: {path} was made with other params or another encoder; starting from scratch")
        if dist.is_main:  # stale files would otherwise shadow (higher step) or mix with the new run's
            for f in [*ckpt.list_checkpoints(ckpt_dir), Path(ckpt_dir) / "best.pt", Path(ckpt_dir) / "last.pt"]:
                f.unlink(missing_ok=True)
        return fresh
    ckpt.restore(payload, p.model, p.optimizer, p.scaler, rank=dist.rank, world_size=dist.world_size)
    state = dict(payload["extra"])
    state["epoch"] = payload["epoch"]
    print(f"finetune: resumed from {path} (epoch {state['epoch']}, best top-1 {state['best_top1']:.2f})")
    return state


def _checkpoint(ckpt_dir, p: _Parts, epoch: int, step: int, state: dict, dist: DistInfo) -> None:
    rng = ckpt.all_rng_states()  # collective
    if dist.is_main:
        extra = {k: v for k, v in state.items() if k != "epoch"}
        payload = ckpt.make_payload(model=p.model, optimizer=p.optimizer, scaler=p.scaler, epoch=epoch, step=step,
                                    data_batches=0, rng=rng, params=p.params, extra=extra)
        ckpt.save(ckpt_dir, payload)
        _save_weights(p.model, Path(ckpt_dir) / "last.pt")


def _save_weights(model, path: Path) -> None:
    from localmim.utils.io import atomic_torch_save

    atomic_torch_save({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)

"""Mask R-CNN training loop (method §9.2): AdamW with layer-wise lr decay, per-iteration warm-up + step or cosine
schedule, bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing), DDP under torchrun, COCO evaluation
every ``eval_every`` epochs and at the end, resumable checkpoints every ``ckpt_every`` epochs.

Determinism: the shuffle order comes from ``DistributedSampler(seed)``; augmentation draws from the loader's
workers, seeded from a generator fixed by ``(seed, epoch, rank)`` (or from the restored global RNG when
``num_workers = 0``), so a run resumed from an epoch checkpoint equals the uninterrupted one on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from localmim.models.layer_decay import param_groups_with_decay
from localmim.train import checkpoint as ckpt
from localmim.utils.distributed import DistInfo, amp_dtype, make_scaler, unwrap

LogFn = Callable[[dict[str, float], int], None]
ENCODER_PREFIX = "backbone.body.encoder."


@dataclass(frozen=True)
class DetSchedule:
    """lr at iteration ``it``: ``lr · warm(it) · decay(it)``. ``warm`` rises linearly from ``warmup_factor`` to 1
    over ``warmup_iters``; ``step`` multiplies by 0.1 at each ``milestones`` fraction of ``total_iters``,
    ``cosine`` falls from ``lr`` to ``min_lr`` over the run (Detectron2's conventions)."""

    lr: float
    total_iters: int
    warmup_iters: int = 0
    kind: str = "step"
    milestones: tuple[float, ...] = ()
    min_lr: float = 0.0
    warmup_factor: float = 0.001

    def __call__(self, it: int) -> float:
        if self.kind == "step":
            lr = self.lr * 0.1 ** sum(it >= m * self.total_iters for m in self.milestones)
        else:
            t = min(it / max(self.total_iters, 1), 1.0)
            lr = self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        if it < self.warmup_iters:
            a = it / self.warmup_iters
            lr *= self.warmup_factor * (1 - a) + a
        return lr

    def apply(self, optimizer, it: int) -> float:
        lr = self(it)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


@dataclass
class DetectResult:
    metrics: dict[str, float]
    results: list[dict[str, Any]]  # COCO results of the last evaluation (all ranks, on rank 0)
    kept: list  # (image, output) pairs for the picture
    epochs: int
    seconds: float
    train_images_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)  # the trained detector's weights


def _train_loader(ds, cfg, dist: DistInfo, epoch: int):
    """This rank's share of ``ds`` for ``epoch`` (a fixed shuffle per epoch; worker seeds fixed by
    ``(seed, epoch, rank)``)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from localmim.data.coco import collate

    sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(((cfg.seed * 1_000_003) + epoch) * 1009 + dist.rank)
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      collate_fn=collate, pin_memory=dist.device.type == "cuda", generator=gen)


def train_one_epoch(model, loader, optimizer, scaler, sched: DetSchedule, *, first_it: int, dev, amp,
                    log_every: int, log_fn: LogFn | None, bar=None) -> tuple[int, float]:
    """One pass over ``loader``; returns ``(images seen, seconds)``. Losses are read (a host sync) every
    ``log_every`` iterations only; a non-finite loss stops the run there."""
    model.train()
    n_images, t0 = 0, time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        it = first_it + i
        lr = sched.apply(optimizer, it)
        images = [im.to(dev, non_blocking=True) for im in images]  # [3, H, W] each
        targets = [{k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n_images += len(images)
        if bar is not None:
            bar.update(1)
        if (it + 1) % log_every == 0:
            vals = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(loss.detach()), "lr": lr}
            if not math.isfinite(vals["loss"]):
                raise FloatingPointError(f"detect: non-finite loss at iteration {it + 1}: {vals}")
            if bar is not None:
                bar.set_postfix({k.removeprefix("loss_"): f"{v:.3g}" for k, v in vals.items()})
            if log_fn is not None:
                log_fn(vals, it + 1)
    return n_images, time.perf_counter() - t0


def evaluate(model, val_set, gt, label_to_cat, cfg, dist: DistInfo, amp, keep_images: int = 0):
    """COCO metrics of ``model`` on ``val_set`` (each rank predicts a strided share, rank 0 scores all)."""
    from localmim.data.coco import collate
    from localmim.eval.detection import coco_eval, predict
    from localmim.utils.distributed import broadcast_object

    share = torch.utils.data.Subset(val_set, list(range(dist.rank, len(val_set), dist.world_size)))
    loader = torch.utils.data.DataLoader(share, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         collate_fn=collate, pin_memory=dist.device.type == "cuda")
    results, kept = predict(unwrap(model), loader, dist.device, label_to_cat, amp, keep_images if dist.is_main else 0)
    if dist.distributed:
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics = coco_eval(gt, results) if dist.is_main else {}
    return broadcast_object(metrics), results, kept


def seed_everything(seed: int) -> None:
    """torch (model init, drop path, augmentation), NumPy and Python RNGs."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_detector(cfg, model, train_set, val_set, gt, label_to_cat: dict[int, int], *, ckpt_dir, params: dict,
                   dist: DistInfo, log_fn: LogFn | None = None, on_epoch_end: Callable[[int], None] | None = None,
                   progress: bool = True) -> DetectResult:
    """Train ``model`` (a torchvision MaskRCNN on :class:`~localmim.models.detection.DetectionBackbone`) on
    ``train_set`` and evaluate on ``val_set`` against the pycocotools index ``gt`` (see the module docstring).

    ``params`` identifies the run: a checkpoint in ``ckpt_dir`` made with other params is never resumed.
    The model must already be built (seeded by the caller) on the CPU; it is moved to ``dist.device`` here.
    """
    from tqdm import tqdm

    from localmim.train.optim import create_adamw

    t_start = time.time()
    dev = dist.device
    model.to(dev)
    groups = param_groups_with_decay(model, unwrap(model).backbone.body.encoder, ENCODER_PREFIX, cfg.weight_decay,
                                     cfg.layer_decay)
    optimizer = create_adamw(groups, lr=0.0, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), device=dev)
    amp = amp_dtype(cfg.amp, dev)
    scaler = make_scaler(dev, amp)
    steps = len(_train_loader(train_set, cfg, dist, 0))
    sched = DetSchedule(cfg.lr, steps * cfg.epochs, cfg.warmup_iters, cfg.schedule, tuple(cfg.milestones), cfg.min_lr)
    state = _resume(ckpt_dir, params, model, optimizer, scaler, dist)
    net = model
    if dist.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    metrics, results, kept, evaluated = state.get("metrics", {}), [], [], False
    for epoch in range(state["epoch"], cfg.epochs):
        bar = tqdm(total=steps, desc=f"detect epoch {epoch + 1}/{cfg.epochs}", unit="it", leave=False,
                   disable=not (progress and dist.is_main), dynamic_ncols=True)
        n, secs = train_one_epoch(net, _train_loader(train_set, cfg, dist, epoch), optimizer, scaler, sched,
                                  first_it=epoch * steps, dev=dev, amp=amp, log_every=cfg.log_every, log_fn=log_fn,
                                  bar=bar)
        bar.close()
        state["images"] += n * dist.world_size
        state["train_seconds"] += secs
        row = {"epoch": epoch + 1, "train_images_per_s": n * dist.world_size / max(secs, 1e-9)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            keep = cfg.vis_images if epoch + 1 == cfg.epochs else 0
            metrics, results, kept = evaluate(model, val_set, gt, label_to_cat, cfg, dist, amp, keep)
            evaluated = True
            row |= metrics
        state["history"].append(row)
        state["metrics"] = metrics
        if log_fn is not None and dist.is_main:
            log_fn({k: v for k, v in row.items() if k != "epoch"}, (epoch + 1) * steps)
        state["seconds"] += time.time() - t_start
        t_start = time.time()
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            _checkpoint(ckpt_dir, model, optimizer, scaler, epoch + 1, (epoch + 1) * steps, params, state, dist)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    if not evaluated:  # resumed after the last epoch: evaluate the restored weights again
        metrics, results, kept = evaluate(model, val_set, gt, label_to_cat, cfg, dist, amp, cfg.vis_images)
    ips = state["images"] / max(state["train_seconds"], 1e-9)
    return DetectResult(metrics, results, kept, len(state["history"]), state["seconds"], ips, state["history"],
                        unwrap(model).state_dict())


def _resume(ckpt_dir, params, model, optimizer, scaler, dist: DistInfo) -> dict[str, Any]:
    """The newest checkpoint made with the same params (weights, optimizer, scaler, RNG); else a fresh state."""
    fresh = {"epoch": 0, "history": [], "seconds": 0.0, "images": 0, "train_seconds": 0.0, "metrics": {}}
    path = ckpt.find_latest(ckpt_dir)
    if path is None:
        return fresh
    payload = ckpt.load(path, map_location=dist.device)
    if payload["params"] != params:
        print(f"detect: {path} was made with other params or another encoder; starting from scratch")
        if dist.is_main:
            for p in ckpt.list_checkpoints(ckpt_dir):
                p.unlink(missing_ok=True)
        return fresh
    ckpt.restore(payload, model, optimizer, scaler, rank=dist.rank, world_size=dist.world_size)
    state = dict(payload["extra"]) | {"epoch": payload["epoch"]}
    print(f"detect: resumed from {path} (epoch {state['epoch']})")
    return state


def _checkpoint(ckpt_dir, model, optimizer, scaler, epoch, step, params, state, dist: DistInfo) -> None:
    rng = ckpt.all_rng_states()  # collective
    if dist.is_main:
        extra = {k: v for k, v in state.items() if k != "epoch"}
        payload = ckpt.make_payload(model=unwrap(model), optimizer=optimizer, scaler=scaler, epoch=epoch, step=step,
                                    data_batches=0, rng=rng, params=params, extra=extra)
        ckpt.save(ckpt_dir, payload)

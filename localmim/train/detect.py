"""Mask R-CNN training loop (method §9.2): AdamW (``betas``) with layer-wise lr decay, per-iteration warm-up + step or
cosine schedule (:class:`~localmim.train.schedule.DetSchedule`), COCO evaluation every ``eval_every`` epochs and at
the end, resumable checkpoints every ``ckpt_every`` epochs. The step, AMP, DDP, the non-finite-loss guard (losses read
every ``log_every`` iterations and at each epoch's end) and the checkpoint rule are the engine's
(:mod:`localmim.train.engine`; the run's identity holds the encoder and the used image/annotation counts).

The model and the datasets are built here from the checked COCO splits (as ``segment`` builds its own). Determinism:
the model is built from ``seed`` (the same on every rank), the rest draws from ``seed + rank``; the shuffle order
comes from ``DistributedSampler(seed)``; augmentation draws from the loader's workers, seeded from a generator fixed
by ``(seed, epoch, rank)`` (or from the restored global RNG when ``num_workers = 0``), so a run resumed from an epoch
checkpoint equals the uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from localmim.models.common import set_grad_checkpointing
from localmim.models.layer_decay import param_groups_with_decay
from localmim.runtime.distributed import DistInfo, setup, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train.engine import Checkpoints, Engine, LogFn, LossMeter, encoder_fingerprint, set_lr
from localmim.train.schedule import DetSchedule

ENCODER_PREFIX = "backbone.body.encoder."
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")  # torchvision's


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


def model_kwargs(cfg) -> dict:
    """The ``detect`` params that shape the detector: ``build_mask_rcnn(enc, num_classes, **model_kwargs(cfg))``."""
    return dict(image_size=cfg.image_size, max_size=cfg.max_size, train_scales=list(cfg.train_scales),
                drop_path=cfg.drop_path, pretrained=cfg.pretrained, anchor_size=cfg.anchor_size,
                window_size=cfg.window_size, global_blocks=list(cfg.global_blocks),
                rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
                box_batch_size_per_image=cfg.box_batch_size_per_image, detections_per_img=cfg.detections_per_img,
                box_head_dim=cfg.box_head_dim, mask_head_channels=cfg.mask_head_channels)


def _train_loader(ds, cfg, dist: DistInfo, epoch: int):
    """This rank's share of ``ds`` for ``epoch`` (a fixed shuffle per epoch; worker seeds fixed by
    ``(seed, epoch, rank)``)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from localmim.data.dense.coco import collate

    sampler = DistributedSampler(ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(((cfg.seed * 1_000_003) + epoch) * 1009 + dist.rank)
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      collate_fn=collate, pin_memory=dist.device.type == "cuda", generator=gen)


def _losses(net, images: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses = net(images, targets)  # torchvision's dict of the RPN and ROI-head losses
    return sum(losses.values()), losses


def train_one_epoch(eng: Engine, loader, sched: DetSchedule, meter: LossMeter, *, first_it: int, log_every: int,
                    log_fn: LogFn | None, bar=None) -> tuple[int, float]:
    """One pass over ``loader``; returns ``(images seen, seconds)``. Losses are read (a host sync, the non-finite
    guard) every ``log_every`` iterations and at the end of the epoch, and logged as means over the interval."""
    eng.net.train()
    n_images, t0, steps = 0, time.perf_counter(), len(loader)
    for i, (images, targets) in enumerate(loader):
        it = first_it + i
        lr = set_lr(eng.opt, sched(it))
        images = [im.to(eng.device, non_blocking=True) for im in images]  # [3, H, W] each
        targets = [{k: (v.to(eng.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        loss, losses = eng.step(partial(_losses, eng.net, images, targets))
        meter.add([loss, *(losses[n] for n in LOSS_NAMES)], it, len(images))
        n_images += len(images)
        if bar is not None:
            bar.update(1)
        if (it + 1) % log_every == 0 or i + 1 == steps:
            vals = {k: v for k, v in meter.read(eng.dist.world_size, epoch=it // steps).items()
                    if k.startswith("loss")} | {"lr": lr}
            if bar is not None:
                bar.set_postfix({k.removeprefix("loss_"): f"{v:.3g}" for k, v in vals.items()})
            if log_fn is not None and eng.dist.is_main:
                log_fn(vals, it + 1)
    return n_images, time.perf_counter() - t0


def evaluate(eng: Engine, val_set, gt, label_to_cat, cfg, keep_images: int = 0):
    """COCO metrics of the model on ``val_set`` (each rank predicts a strided share, rank 0 scores all)."""
    from localmim.data.dense.coco import collate
    from localmim.eval.detection import coco_eval, predict
    from localmim.runtime.distributed import broadcast_object

    dist = eng.dist
    share = torch.utils.data.Subset(val_set, list(range(dist.rank, len(val_set), dist.world_size)))
    loader = torch.utils.data.DataLoader(share, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         collate_fn=collate, pin_memory=dist.device.type == "cuda")
    results, kept = predict(eng.model, loader, dist.device, label_to_cat, eng.prec.dtype,
                            keep_images if dist.is_main else 0)
    if dist.distributed:
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics = coco_eval(gt, results) if dist.is_main else {}
    return broadcast_object(metrics), results, kept


def _build(cfg, enc, train, val, dist: DistInfo, skips: dict) -> tuple[Engine, Any, Any]:
    """The detector (from ``seed`` on every rank) in an engine, and the train / val datasets (an image that fails
    to load follows ``skips[split]``: training substitutes the next one, evaluation leaves it out)."""
    from localmim.data.dense.coco import coco_dataset
    from localmim.data.dense.coco_transforms import eval_transforms, train_transforms
    from localmim.models.detection import build_mask_rcnn
    from localmim.train.optim import create_adamw

    seed_everything(cfg.seed)  # the same initial model on every rank
    model = build_mask_rcnn(enc, len(train.cat_ids), **model_kwargs(cfg))
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    seed_everything(cfg.seed + dist.rank)  # drop path, augmentation (num_workers = 0)
    train_set = coco_dataset(train, train_transforms(train, cfg.augment, cfg.image_size, cfg.scale_range),
                             skips.get("train"), train=True)
    val_set = coco_dataset(val, eval_transforms(val), skips.get("val"))
    model.to(dist.device)
    groups = param_groups_with_decay(model, model.backbone.body.encoder, ENCODER_PREFIX, cfg.weight_decay,
                                     cfg.layer_decay)
    opt = create_adamw(groups, lr=0.0, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), device=dist.device)
    return Engine(model, wrap_ddp(model, dist), opt, Precision.of(cfg.amp, dist.device), dist), train_set, val_set


def run_detect(cfg, enc, train, val, ckpt_dir, *, dist: DistInfo | None = None, log_fn: LogFn | None = None,
               on_epoch_end: Callable[[int], None] | None = None, progress: bool = True,
               skips: dict | None = None) -> DetectResult:
    """Train Mask R-CNN on the exported encoder ``enc`` (an ``EncoderSpec``) on the checked COCO split ``train``
    (a :class:`~localmim.data.dense.coco.CocoSplit`) and evaluate on ``val`` (see the module docstring), resuming this
    run's newest checkpoint under ``ckpt_dir``. ``skips``: ``{split: LoadSkips}``, the load-time rule of each split
    (default: a file that fails to load raises, naming it)."""
    from tqdm import tqdm

    from localmim.data.raw.imagefile import LoadSkips
    from localmim.eval.detection import ScoredGroundTruth

    t_start = time.time()
    dist = setup(cfg.device, dist)
    skips = skips or {}
    eng, train_set, val_set = _build(cfg, enc, train, val, dist, skips)
    gt = ScoredGroundTruth(val, skips.get("val") or LoadSkips())  # images that failed to load are not scored
    counts = {s: {"images": r.images_used, "annotations": r.annotations_used}
              for s, r in (("train", train.report), ("val", val.report))}
    ckpts = Checkpoints.of(ckpt_dir, "detect", cfg, dist, encoder=encoder_fingerprint(enc),
                           data=json.dumps(counts, sort_keys=True))
    steps = len(_train_loader(train_set, cfg, dist, 0))
    sched = DetSchedule(cfg.lr, steps * cfg.epochs, cfg.warmup_iters, cfg.schedule, tuple(cfg.milestones), cfg.min_lr)
    payload = ckpts.resume(eng)
    state = (dict(payload["extra"]) | {"epoch": payload["epoch"]} if payload else
             {"epoch": 0, "history": [], "seconds": 0.0, "images": 0, "train_seconds": 0.0, "metrics": {}})
    meter = LossMeter("detect", ["loss", *LOSS_NAMES], dist.device, ckpts)
    metrics, results, kept, evaluated = state.get("metrics", {}), [], [], False
    for epoch in range(state["epoch"], cfg.epochs):
        bar = tqdm(total=steps, desc=f"detect epoch {epoch + 1}/{cfg.epochs}", unit="it", leave=False,
                   disable=not (progress and dist.is_main), dynamic_ncols=True)
        n, secs = train_one_epoch(eng, _train_loader(train_set, cfg, dist, epoch), sched, meter,
                                  first_it=epoch * steps, log_every=cfg.log_every, log_fn=log_fn, bar=bar)
        bar.close()
        state["images"] += n * dist.world_size
        state["train_seconds"] += secs
        row = {"epoch": epoch + 1, "train_images_per_s": n * dist.world_size / max(secs, 1e-9)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            keep = cfg.vis_images if epoch + 1 == cfg.epochs else 0
            metrics, results, kept = evaluate(eng, val_set, gt, val.label_to_cat, cfg, keep)
            evaluated = True
            row |= metrics
        state["history"].append(row)
        state["metrics"] = metrics
        if log_fn is not None and dist.is_main:
            log_fn({k: v for k, v in row.items() if k != "epoch"}, (epoch + 1) * steps)
        state["seconds"] += time.time() - t_start
        t_start = time.time()
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            ckpts.save(eng, epoch=epoch + 1, step=(epoch + 1) * steps, extra={k: v for k, v in state.items()
                                                                             if k != "epoch"})
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    if not evaluated:  # resumed after the last epoch: evaluate the restored weights again
        metrics, results, kept = evaluate(eng, val_set, gt, val.label_to_cat, cfg, cfg.vis_images)
    ips = state["images"] / max(state["train_seconds"], 1e-9)
    return DetectResult(metrics, results, kept, len(state["history"]), state["seconds"], ips, state["history"],
                        eng.model.state_dict())

"""Semantic-segmentation training loop (method §9.1): UperNet on the exported encoder, iteration-based.

* AdamW (``betas``) with layer-wise lr decay over the encoder
  (:func:`localmim.models.layer_decay.param_groups_with_decay`; neck and heads at the full rate), poly schedule with
  linear warm-up (:class:`~localmim.train.schedule.PolyWarmup`), set every iteration.
* Loss: cross-entropy (ignore 255) on the decode logits + ``aux_weight`` x the auxiliary head's.
* BatchNorm becomes SyncBatchNorm under DDP on CUDA. The step, AMP, DDP, the non-finite-loss guard (losses read every
  ``log_every`` steps) and the checkpoint rule are the engine's (:mod:`localmim.train.engine`; the run's identity
  holds the encoder and the training list). Checkpoints every ``ckpt_every`` iterations; the data stream is a pure
  function of the step (:class:`localmim.data.dense.ade20k.StepBatches`), so a resumed run is bit-identical to an
  uninterrupted one on CPU.
* Evaluation every ``eval_every`` iterations and at the end (:func:`localmim.eval.segmentation.evaluate`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from localmim.data.dense.ade20k import IGNORE, Pair, StepBatches, TrainSet, ValSet
from localmim.data.dense.ade20k_transforms import train_transform
from localmim.eval.segmentation import evaluate
from localmim.models.common import set_grad_checkpointing
from localmim.models.encoder_io import EncoderSpec
from localmim.models.layer_decay import param_groups_with_decay
from localmim.models.segmentation import Segmenter, build_segmenter
from localmim.runtime.distributed import DistInfo, setup, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train.engine import Checkpoints, Engine, LogFn, LossMeter, encoder_fingerprint, set_lr
from localmim.train.optim import create_adamw
from localmim.train.schedule import PolyWarmup


@dataclass
class SegmentResult:
    model: Segmenter
    metrics: dict  # last evaluation (mIoU, mAcc, aAcc, per-class) + training summary
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None


def inference_mode(cfg, model: Segmenter) -> str:
    """``slide`` for ViT, ``whole`` for Swin (method §9.1) unless ``cfg.inference`` says otherwise."""
    if cfg.inference != "auto":
        return cfg.inference
    return "whole" if model.backbone.swin else "slide"


def pairs_fingerprint(pairs: list[Pair]) -> str:
    """Identity of a training list: every pair's stem and file sizes (a new list never resumes an old run)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.stem}:{p.image.stat().st_size}:{p.annotation.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _build(cfg, enc: EncoderSpec, dist: DistInfo) -> Engine:
    seed_everything(cfg.seed)  # identical init on every rank
    model = build_segmenter(enc, cfg.num_classes, crop_size=cfg.crop_size, channels=cfg.channels,
                            aux_channels=cfg.aux_channels, drop_path=cfg.drop_path, pretrained=cfg.pretrained)
    if dist.distributed and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dist.device)
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    groups = param_groups_with_decay(model, model.backbone.encoder, "backbone.encoder.", cfg.weight_decay,
                                     cfg.layer_decay)
    opt = create_adamw(groups, cfg.lr, cfg.weight_decay, tuple(cfg.betas), dist.device)
    return Engine(model, wrap_ddp(model, dist), opt, Precision.of(cfg.amp, dist.device), dist)


def _loaders(cfg, train_pairs, val_pairs, dist: DistInfo, start: int):
    pin = dist.device.type == "cuda"
    tf = train_transform(cfg.crop_size, tuple(cfg.scale), tuple(cfg.ratio_range), cfg.cat_max_ratio)
    sampler = StepBatches(len(train_pairs), cfg.batch_size, cfg.iters, cfg.seed, dist.rank, dist.world_size, start)
    # an own generator: creating the loader iterator must not draw from the training RNG (exact resume)
    train = torch.utils.data.DataLoader(TrainSet(train_pairs, tf), batch_sampler=sampler, num_workers=cfg.num_workers,
                                        pin_memory=pin, persistent_workers=False,
                                        generator=torch.Generator().manual_seed(cfg.seed))
    val = torch.utils.data.DataLoader(ValSet(val_pairs, tuple(cfg.test_scale), dist.rank, dist.world_size),
                                      batch_size=1, num_workers=min(cfg.num_workers, 1), pin_memory=pin,
                                      generator=torch.Generator().manual_seed(cfg.seed))
    return train, val


def _evaluate(cfg, eng: Engine, val, on_pred=None) -> dict:
    return evaluate(eng.model, val, eng.device, cfg.num_classes, mode=inference_mode(cfg, eng.model),
                    crop=cfg.crop_size, stride=cfg.slide_stride, amp_dtype=eng.prec.dtype, on_pred=on_pred)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (``!= 255``); 0, not NaN, when a batch has none."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def _losses(net, imgs: torch.Tensor, labels: torch.Tensor, aux_weight: float):
    """``(decode + aux_weight · aux, decode, aux)`` cross-entropies of one batch."""
    logits, aux = net(imgs)  # [B, K, S, S] each
    loss_main = seg_loss(logits, labels)
    loss_aux = seg_loss(aux, labels) if aux is not None else 0 * loss_main
    return loss_main + aux_weight * loss_aux, loss_main, loss_aux


def run_segment(cfg, enc: EncoderSpec, train_pairs: list[Pair], val_pairs: list[Pair], ckpt_dir: str | Path, *,
                log_fn: LogFn | None = None, on_pred: Callable[[int, torch.Tensor], None] | None = None,
                progress: bool = True, dist: DistInfo | None = None) -> SegmentResult:
    """Train UperNet on ``train_pairs`` for ``cfg.iters`` iterations, resuming from ``ckpt_dir`` (see the module
    docstring); the final evaluation on ``val_pairs`` calls ``on_pred(index, pred)`` for every prediction."""
    from tqdm import tqdm

    dist = setup(cfg.device, dist)
    eng = _build(cfg, enc, dist)
    ckpts = Checkpoints.of(ckpt_dir, "segment", cfg, dist, encoder=encoder_fingerprint(enc),
                           data=pairs_fingerprint(train_pairs))
    payload = ckpts.resume(eng)
    step, history = (payload["step"], list(payload["extra"]["history"])) if payload else (0, [])
    train, val = _loaders(cfg, train_pairs, val_pairs, dist, step)
    sched = PolyWarmup(cfg.lr, cfg.iters, cfg.power, cfg.min_lr, cfg.warmup_iters, cfg.warmup_ratio)
    meter, summary, train_s = LossMeter("segment", ["loss_decode", "loss_aux"], dist.device, ckpts), {}, 0.0
    bar = tqdm(total=cfg.iters, initial=step, desc="segment", disable=not (progress and dist.is_main),
               dynamic_ncols=True)
    eng.net.train()
    for imgs, labels in train:
        lr = set_lr(eng.opt, sched(step))
        imgs = imgs.to(dist.device, non_blocking=True)  # uint8 [B, 3, S, S]
        labels = labels.to(dist.device, non_blocking=True).long()  # [B, S, S], 255 = ignore
        _, main, aux = eng.step(partial(_losses, eng.net, imgs, labels, cfg.aux_weight))
        meter.add([main, aux], step, imgs.shape[0])
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.iters:
            t = time.perf_counter() - meter.t0
            m = meter.read(dist.world_size)
            train_s += t
            summary = {"loss": m["loss_decode"] + cfg.aux_weight * m["loss_aux"], "loss_decode": m["loss_decode"],
                       "loss_aux": m["loss_aux"], "lr": lr, "images_per_s": m["images_per_s"]}
            bar.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{lr:.2e}")
            if dist.is_main and log_fn is not None:
                log_fn(summary, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.iters:
            te = time.perf_counter()
            history.append(_eval_row(_evaluate(cfg, eng, val), step))
            meter.t0 += time.perf_counter() - te  # evaluation time is not training time
            if dist.is_main and log_fn is not None:
                log_fn({k: v for k, v in history[-1].items() if k != "step"}, step)
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            ckpts.save(eng, epoch=0, step=step, batches=step, extra={"history": history})
    bar.close()
    ev = _evaluate(cfg, eng, val, on_pred)
    history.append(_eval_row(ev, step))
    if dist.is_main and log_fn is not None:
        log_fn({k: v for k, v in history[-1].items() if k != "step"}, step)
    metrics = {**ev, "iters": step, "train_seconds": train_s, "world_size": dist.world_size,
               **{f"final_{k}": v for k, v in summary.items()}}
    return SegmentResult(eng.model, metrics, history, ckpts.last)


def _eval_row(ev: dict, step: int) -> dict:
    return {"step": step, "mIoU": ev["mIoU"], "mAcc": ev["mAcc"], "aAcc": ev["aAcc"]}

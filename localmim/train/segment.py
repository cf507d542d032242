"""Semantic-segmentation training loop (method §9.1): UperNet on the exported encoder, iteration-based.

* AdamW (``betas``) with layer-wise lr decay over the encoder
  (:func:`localmim.models.layer_decay.param_groups_with_decay`; neck and heads at the full rate), poly schedule with
  linear warm-up (:class:`~localmim.train.schedule.PolyWarmup`), set every iteration.
* Loss: cross-entropy (ignore 255) on the decode logits + ``aux_weight`` x the auxiliary head's.
* The recipe is the global batch: every optimizer step averages ``global_batch`` crops, each rank accumulating
  ``global_batch / (batch_size x world)`` micro-batches (each micro-batch's loss is its own mean over its labelled
  pixels, as each GPU's is under DDP; BatchNorm statistics are per micro-batch).
* BatchNorm becomes SyncBatchNorm under DDP on CUDA. The loop (step, accumulation, AMP, DDP, the non-finite-loss guard
  with losses read every ``log_every`` steps, cadence, checkpoints, resume) is :mod:`localmim.train.loop`'s,
  iteration-based: one "epoch" of ``iters`` steps; the run's identity holds the encoder and the training list, not
  the world size. Checkpoints by iterations and minutes; the data stream is a pure function of the step and the
  global batch (:class:`localmim.data.dense.samplers.StepBatches`), so a resumed run is bit-identical to an
  uninterrupted one on CPU, and a run resumed on another world size continues with the same global batches.
* Evaluation every ``eval_every`` iterations and at the end (:func:`localmim.eval.segmentation.evaluate`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from localmim.data.dense.ade20k import IGNORE, Pair, TrainSet, ValSet
from localmim.data.dense.ade20k_transforms import train_transform
from localmim.data.dense.samplers import StepBatches
from localmim.eval.segmentation import evaluate
from localmim.models.common import set_grad_checkpointing
from localmim.models.encoder_io import EncoderSpec
from localmim.models.layer_decay import param_groups_with_decay
from localmim.models.segmentation import Segmenter, SegmenterSpec, build_segmenter
from localmim.runtime.distributed import DistInfo, setup, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train import loop
from localmim.train.engine import Checkpoints, Engine, LogFn, encoder_fingerprint
from localmim.train.optim import create_adamw
from localmim.train.schedule import PolyWarmup, StepSchedule


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


def check_batch_norm(cfg, dist: DistInfo) -> None:
    """Refuse a per-device batch that leaves UperNet's BatchNorm one value per channel: the pyramid pooling's 1x1 bin
    sees ``batch_size`` values per channel (x the world size under SyncBatchNorm: DDP on CUDA).

    Raises:
        ValueError: ``batch_size`` 1 without SyncBatchNorm across ranks (the message says what to set).
    """
    sync = dist.distributed and dist.device.type == "cuda"
    if cfg.batch_size * (dist.world_size if sync else 1) < 2:
        raise ValueError(f"segment.batch_size={cfg.batch_size}: UperNet's BatchNorm at the pyramid pooling's 1x1 bin "
                         f"needs 2 values per channel; use batch_size >= 2 (or 2+ CUDA ranks: SyncBatchNorm)")


def _build(cfg, enc: EncoderSpec, dist: DistInfo) -> Engine:
    seed_everything(cfg.seed)  # identical init on every rank
    model = build_segmenter(enc, SegmenterSpec.from_config(cfg), pretrained=cfg.pretrained)
    if dist.distributed and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dist.device)
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    groups = param_groups_with_decay(model, model.backbone.encoder, "backbone.encoder.", cfg.weight_decay,
                                     cfg.layer_decay)
    opt = create_adamw(groups, cfg.lr, cfg.weight_decay, tuple(cfg.betas), dist.device)
    return Engine(model, wrap_ddp(model, dist), opt, Precision.of(cfg.amp, dist.device), dist)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (``!= 255``); 0, not NaN, when a batch has none."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


class SegmentMethod(loop.Method):
    """UperNet on ADE20K pairs: batches of the step-indexed sampler, decode + auxiliary cross-entropy, mIoU / mAcc /
    aAcc on the val pairs (the final evaluation calls ``on_pred(index, pred)`` for every prediction and keeps the
    full scores in :attr:`final`)."""

    def __init__(self, cfg, eng: Engine, train_pairs: list[Pair], val_pairs: list[Pair],
                 on_pred: Callable[[int, torch.Tensor], None] | None):
        self.cfg, self.eng, self.train_pairs, self.on_pred = cfg, eng, train_pairs, on_pred
        dist = eng.dist
        # own generators: creating a loader iterator must not draw from the training RNG (exact resume)
        self.val = torch.utils.data.DataLoader(
            ValSet(val_pairs, tuple(cfg.test_scale), dist.rank, dist.world_size), batch_size=1,
            num_workers=min(cfg.num_workers, 1), pin_memory=dist.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed))
        self.final: dict | None = None

    def batches(self, epoch: int, done: int, position):
        cfg, dist = self.cfg, self.eng.dist
        tf = train_transform(cfg.crop_size, tuple(cfg.scale), tuple(cfg.ratio_range), cfg.cat_max_ratio)
        sampler = StepBatches(len(self.train_pairs), cfg.batch_size, cfg.iters, cfg.seed, dist.rank,
                              dist.world_size, done, global_batch=cfg.global_batch)  # steps done..iters, x accum
        return torch.utils.data.DataLoader(TrainSet(self.train_pairs, tf), batch_sampler=sampler,
                                           num_workers=cfg.num_workers, pin_memory=dist.device.type == "cuda",
                                           persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed))

    def loss(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        imgs, labels = batch
        imgs = imgs.to(self.eng.device, non_blocking=True)  # uint8 [B, 3, S, S]
        labels = labels.to(self.eng.device, non_blocking=True).long()  # [B, S, S], 255 = ignore
        logits, aux = self.eng.net(imgs)  # [B, K, S, S] each
        main = seg_loss(logits, labels)
        aux_loss = seg_loss(aux, labels) if aux is not None else 0 * main
        total = main + self.cfg.aux_weight * aux_loss
        return total, [total, main, aux_loss]

    def count(self, batch) -> int:
        return batch[0].shape[0]

    def evaluate(self, st: loop.LoopState, final: bool) -> dict[str, float]:
        cfg = self.cfg
        ev = evaluate(self.eng.model, self.val, self.eng.device, cfg.num_classes,
                      mode=inference_mode(cfg, self.eng.model), crop=cfg.crop_size, stride=cfg.slide_stride,
                      amp_dtype=self.eng.prec.dtype, on_pred=self.on_pred if final else None)
        if final:
            self.final = ev
        return {"mIoU": ev["mIoU"], "mAcc": ev["mAcc"], "aAcc": ev["aAcc"]}


def run_segment(cfg, enc: EncoderSpec, train_pairs: list[Pair], val_pairs: list[Pair], ckpt_dir: str | Path, *,
                log_fn: LogFn | None = None, on_pred: Callable[[int, torch.Tensor], None] | None = None,
                progress: bool = True, dist: DistInfo | None = None) -> loop.LoopResult:
    """Train UperNet on ``train_pairs`` for ``cfg.iters`` iterations, resuming from ``ckpt_dir`` (see the module
    docstring); the final evaluation on ``val_pairs`` calls ``on_pred(index, pred)`` for every prediction. The
    result's ``metrics`` hold the final evaluation (mIoU, mAcc, aAcc, per-class scores, confusion), ``iters`` and the
    loop's counters."""
    dist = setup(cfg.device, dist)
    accum = cfg.accum_for(dist.world_size)  # refuse a global batch that does not divide before any work
    check_batch_norm(cfg, dist)
    StepBatches(len(train_pairs), cfg.batch_size, cfg.iters, cfg.seed, dist.rank, dist.world_size,
                global_batch=cfg.global_batch)  # raises when the pairs are fewer than one global batch
    eng = _build(cfg, enc, dist)
    ckpts = Checkpoints.of(ckpt_dir, "segment", cfg, dist, encoder=encoder_fingerprint(enc),
                           data=pairs_fingerprint(train_pairs))
    method = SegmentMethod(cfg, eng, train_pairs, val_pairs, on_pred)
    cadence = loop.Cadence.of(cfg, "step", eval_every=cfg.eval_every)
    plan = loop.Plan("segment", 1, cfg.iters, ("loss", "loss_decode", "loss_aux"), accum, cadence, cfg.seed,
                     progress=progress)
    sched = PolyWarmup(cfg.lr, cfg.iters, cfg.power, cfg.min_lr, cfg.warmup_iters, cfg.warmup_ratio)
    res = loop.run(method, eng, StepSchedule(eng.opt, sched), plan, ckpts=ckpts, log_fn=log_fn)
    if method.final is None:  # resumed after the final evaluation's step: score the restored weights again
        row = method.evaluate(loop.LoopState(step=res.metrics["steps"]), final=True)
        res.metrics.update(row)
    res.metrics.update(method.final, iters=res.metrics["steps"])
    return res

"""Fine-tuning (method §8): a standard timm classifier initialised from the exported LocalMIM encoder.

Recipe: the global batch (``global_batch``; each rank accumulates ``global_batch / (batch_size × world)``
micro-batches per step), AdamW (``betas``, method §8: 0.9, 0.999) with layer-wise lr decay (``models.layer_decay``),
per-iteration warm-up + cosine schedule, timm Mixup/CutMix with label smoothing folded into soft targets and
``SoftTargetCrossEntropy``, drop path, global average pooling (ViT: patch tokens -> fresh LayerNorm -> head; Swin:
all tokens -> fresh LayerNorm -> head), head weight trunc-normal std 2e-5. No gradient clipping, no EMA. Top-1/top-5
on the val shards after every epoch. The loop (step, accumulation, AMP, DDP, the non-finite-loss guard, cadence,
checkpoints, resume on any world size) is :mod:`localmim.train.loop`'s; the run's identity holds the encoder and the
train manifest. The best and the last weights are kept as plain timm state dicts (``best.pt``, ``last.pt``) in the
run's checkpoint directory (the stage copies them to its outputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from localmim.models.common import set_grad_checkpointing
from localmim.models.encoder_io import ClassifierSpec, EncoderSpec, build_classifier
from localmim.models.layer_decay import layer_decay_groups
from localmim.runtime.distributed import DistInfo, setup, unwrap, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train import loop
from localmim.train.engine import Checkpoints, Engine, LogFn, data_fingerprint, encoder_fingerprint
from localmim.train.schedule import WarmupCosine


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


@dataclass
class FinetuneData:
    """What fine-tuning reads and where it keeps its state: train/val shard directories, the checkpoint root (each
    run keeps its checkpoints and ``best.pt`` / ``last.pt`` in its own keyed sub-directory), and the class count
    (None: the train manifest's)."""

    train_dir: str | Path
    val_dir: str | Path
    ckpt_dir: str | Path
    num_classes: int | None = None


class FinetuneMethod(loop.Method):
    """Classification with Mixup/CutMix on labelled shards (``train``: a
    :class:`~localmim.data.shards.stream.ShardLoader` with ``with_index``), evaluated on ``val`` after every epoch;
    keeps the best weights."""

    def __init__(self, cfg, eng: Engine, train, val, mixup_fn, criterion, run_dir: Path):
        self.cfg, self.eng, self.train, self.val = cfg, eng, train, val
        self.mixup_fn, self.criterion, self.run_dir = mixup_fn, criterion, run_dir
        self.best_top1, self.best_epoch = -1.0, 0

    def batches(self, epoch: int, done: int, position: dict[str, Any] | None):
        return self.train.from_step(epoch, done, position)

    def loss(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        (images, labels), _ = batch
        images = images.to(self.eng.device, non_blocking=True)  # [B, 3, S, S]
        labels = labels.to(self.eng.device, non_blocking=True)  # [B]
        if self.mixup_fn is not None:
            images, labels = self.mixup_fn(images, labels)  # labels -> soft targets [B, C]
        loss = self.criterion(self.eng.net(images), labels)  # [B, C] logits vs [B] labels or [B, C] soft targets
        return loss, [loss]

    def count(self, batch) -> int:
        return batch[0][0].shape[0]

    def position(self) -> dict[str, Any] | None:
        return self.train.position()

    def evaluate(self, st: loop.LoopState, final: bool) -> dict[str, float]:
        """Top-1 / top-5 / loss on the val shards (all ranks); the best weights to ``best.pt`` (rank 0)."""
        from localmim.eval.classify import evaluate

        ev = evaluate(self.eng.model, self.val.epoch(0), self.eng.device, self.eng.prec.dtype,
                      num_classes=unwrap(self.eng.model).num_classes)
        if ev["top1"] > self.best_top1:
            self.best_top1, self.best_epoch = ev["top1"], st.epoch
            if self.eng.dist.is_main:
                _save_weights(self.eng.model, self.run_dir / "best.pt")
        return {"train_loss": st.summary.get("train_loss", float("nan")), "lr": st.summary.get("lr", 0.0),
                "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "val_samples": ev["n"],
                "best_top1": self.best_top1}

    def state_dict(self) -> dict[str, Any]:
        return {"best_top1": self.best_top1, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_top1, self.best_epoch = state.get("best_top1", -1.0), state.get("best_epoch", 0)

    def checkpointed(self, path: Path | None) -> None:
        if self.eng.dist.is_main:
            _save_weights(self.eng.model, self.run_dir / "last.pt")


def finetune(cfg, enc: EncoderSpec, data: FinetuneData, *, log_fn: LogFn | None = None,
             dist: DistInfo | None = None, progress: bool = False) -> loop.LoopResult:
    """Fine-tune ``enc`` on ``data.train_dir`` and evaluate on ``data.val_dir`` every epoch (module docstring).

    Keeps ``best.pt`` / ``last.pt`` (plain timm state dicts) in the run's checkpoint directory (the result's
    ``run_dir``) and resumes from its newest checkpoint. The result's ``metrics`` hold the last epoch's ``top1``,
    ``top5``, ``val_loss``, ``val_samples``, the best top-1 and its epoch (``best_top1``, ``best_epoch``), ``seconds``
    (this call's wall time) and the counters; its ``state["spec"]`` (a
    :class:`~localmim.models.encoder_io.ClassifierSpec`) rebuilds the model."""
    t0 = time.time()
    dist = setup(cfg.device, dist)
    cfg.accum_for(dist.world_size)  # refuse a global batch that does not divide before any work
    seed_everything(cfg.seed + dist.rank)  # drop path, RandAugment/erasing workers, Mixup (DDP broadcasts the init)
    method, ckpts, plan = _build(cfg, enc, data, dist, progress)
    schedule = WarmupCosine(method.eng.opt, cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    res = loop.run(method, method.eng, schedule, plan, ckpts=ckpts, log_fn=log_fn)
    res.metrics.update(best_top1=method.best_top1, best_epoch=method.best_epoch, seconds=time.time() - t0)
    res.state["spec"] = ClassifierSpec.of(enc, unwrap(method.eng.model).num_classes, model=cfg.model,
                                          input_size=cfg.input_size)
    return res


def _build(cfg, enc: EncoderSpec, data: FinetuneData, dist: DistInfo,
           progress: bool) -> tuple[FinetuneMethod, Checkpoints, loop.Plan]:
    from localmim.data.classify import ClassifyShards, build_transform, num_classes_of
    from localmim.data.shards.stream import ShardLoader
    from localmim.train.optim import create_adamw

    dev, pin = dist.device, dist.device.type == "cuda"
    num_classes = data.num_classes or num_classes_of(data.train_dir)
    if not num_classes:
        raise ValueError(f"{data.train_dir}: class count unknown (no manifest 'classes'); pass num_classes")
    size = cfg.input_size or enc.img_size
    model = build_classifier(enc, num_classes, model=cfg.model, drop_path=cfg.drop_path, input_size=size).to(dev)
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    optimizer = create_adamw(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=0.0,
                             weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), device=dev)
    tf = build_transform(size, train=True, aa=cfg.aa, reprob=cfg.reprob, remode=cfg.remode, recount=cfg.recount)
    train_ds = ClassifyShards(data.train_dir, tf, batch_size=cfg.batch_size, train=True, rank=dist.rank,
                              world=dist.world_size, seed=cfg.seed, global_batch=cfg.global_batch, with_index=True)
    val_ds = ClassifyShards(data.val_dir, build_transform(size, train=False), batch_size=cfg.batch_size,
                            train=False, rank=dist.rank, world=dist.world_size)
    net = torch.compile(model) if cfg.compile else model
    eng = Engine(model, wrap_ddp(net, dist), optimizer, Precision.of(cfg.amp, dev), dist)
    ckpts = Checkpoints.of(data.ckpt_dir, "finetune", cfg, dist, encoder=encoder_fingerprint(enc),
                           data=data_fingerprint(data.train_dir))
    method = FinetuneMethod(cfg, eng, ShardLoader(train_ds, cfg.num_workers, pin), ShardLoader(val_ds,
                            cfg.num_workers, pin), *build_mixup(cfg, num_classes), ckpts.dir)
    cadence = loop.Cadence.of(cfg, "epoch", eval_every=1)
    plan = loop.Plan("finetune", cfg.epochs, train_ds.optimizer_steps, ("train_loss",), train_ds.accum, cadence,
                     cfg.seed, progress=progress and dist.is_main)
    return method, ckpts, plan


def _save_weights(model, path: Path) -> None:
    from localmim.utils.io import atomic_torch_save

    atomic_torch_save({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)

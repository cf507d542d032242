"""Fine-tuning (method §8): a standard timm classifier initialised from the exported LocalMIM encoder.

Recipe: AdamW (``betas``, method §8: 0.9, 0.999) with layer-wise lr decay (``models.layer_decay``), per-iteration
warm-up + cosine schedule, timm Mixup/CutMix with label smoothing folded into soft targets and
``SoftTargetCrossEntropy``, drop path, global average pooling (ViT: patch tokens -> fresh LayerNorm -> head; Swin:
all tokens -> fresh LayerNorm -> head), head weight trunc-normal std 2e-5. No gradient clipping, no EMA. Top-1/top-5
on the val shards after every epoch. The step, AMP, DDP, the non-finite-loss guard and the checkpoint rule are the
engine's (:mod:`localmim.train.engine`; the run's identity holds the encoder and the train manifest); resumable
checkpoints every ``ckpt_every`` epochs, and the best and the last weights as plain timm state dicts (``best.pt``,
``last.pt``) in the run's checkpoint directory (the stage copies them to its outputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from localmim.models.common import set_grad_checkpointing
from localmim.models.encoder_io import EncoderSpec, build_classifier, classifier_head
from localmim.models.layer_decay import layer_decay_groups
from localmim.runtime.distributed import DistInfo, setup, unwrap, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train.engine import Checkpoints, Engine, LogFn, LossMeter, data_fingerprint, encoder_fingerprint, set_lr
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


def _loss(net, criterion, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return criterion(net(images), labels)  # [B, C] logits vs [B] labels or [B, C] soft targets


def train_one_epoch(eng: Engine, loader, schedule: WarmupCosine, criterion, mixup_fn, meter: LossMeter, *,
                    epoch: int, steps: int, accum_iter: int) -> None:
    """One epoch of ``steps`` batches; per-batch losses go to ``meter`` (no host sync here). The lr is set at the
    start of each accumulation cycle (``accum_iter=k, batch b`` steps like ``accum_iter=1, batch k*b``)."""
    eng.net.train()
    for it, (images, labels) in enumerate(loader):
        if it >= steps:
            break
        if it % accum_iter == 0:
            set_lr(eng.opt, schedule(epoch + it / steps))
        images = images.to(eng.device, non_blocking=True)  # [B, 3, S, S]
        labels = labels.to(eng.device, non_blocking=True)  # [B]
        if mixup_fn is not None:
            images, labels = mixup_fn(images, labels)  # labels -> soft targets [B, C]
        loss = eng.step(partial(_loss, eng.net, criterion, images, labels), it=it, accum=accum_iter, steps=steps)
        meter.add([loss], epoch * steps + it)


@dataclass
class FinetuneData:
    """What fine-tuning reads and where it keeps its state: train/val shard directories, the checkpoint root (each
    run keeps its checkpoints and ``best.pt`` / ``last.pt`` in its own keyed sub-directory), and the class count
    (None: the train manifest's)."""

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
    run_dir: Path | None = None  # the run's checkpoint directory: best.pt, last.pt


@dataclass
class _Parts:
    """Everything one fine-tuning run trains with, besides the engine."""

    schedule: WarmupCosine
    train_ds: Any
    val_ds: Any
    mixup_fn: Any
    criterion: Any
    ckpts: Checkpoints


def finetune(cfg, enc: EncoderSpec, data: FinetuneData, *, log_fn: LogFn | None = None,
             dist: DistInfo | None = None) -> FinetuneResult:
    """Fine-tune ``enc`` on ``data.train_dir`` and evaluate on ``data.val_dir`` every epoch (module docstring).

    Keeps ``best.pt`` / ``last.pt`` (plain timm state dicts) in the run's checkpoint directory (``run_dir`` of the
    result) and resumes from its newest checkpoint; the result's ``recipe`` says how to rebuild the model.
    """
    from localmim.data.classify import make_loader

    t0 = time.time()
    dist = setup(cfg.device, dist)
    seed_everything(cfg.seed + dist.rank)  # drop path, RandAugment/erasing workers, Mixup (DDP broadcasts the init)
    eng, p = _build(cfg, enc, data, dist)
    state = _resume(p.ckpts, eng)
    prior_seconds, steps, pin = state["seconds"], len(p.train_ds), dist.device.type == "cuda"
    meter = LossMeter("finetune", ["train_loss"], dist.device, p.ckpts)
    for epoch in range(state["epoch"], cfg.epochs):
        p.train_ds.set_epoch(epoch)
        train_one_epoch(eng, make_loader(p.train_ds, cfg.num_workers, pin), p.schedule, p.criterion, p.mixup_fn,
                        meter, epoch=epoch, steps=steps, accum_iter=cfg.accum_for(dist.world_size))
        train_loss = meter.read(dist.world_size, epoch=epoch)["train_loss"]  # one sync
        _end_epoch(cfg, eng, p, state, epoch, train_loss, log_fn)
        state["seconds"] = prior_seconds + time.time() - t0
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            p.ckpts.save(eng, epoch=epoch + 1, step=(epoch + 1) * steps, extra={k: v for k, v in state.items()
                                                                               if k != "epoch"})
            if dist.is_main:
                _save_weights(eng.model, p.ckpts.dir / "last.pt")
    last = state["history"][-1]
    return FinetuneResult(last["top1"], last["top5"], state["best_top1"], state["best_epoch"], len(state["history"]),
                          prior_seconds + time.time() - t0, state["history"], _recipe(eng.model, enc, cfg, state),
                          p.ckpts.dir)


def _build(cfg, enc: EncoderSpec, data: FinetuneData, dist: DistInfo) -> tuple[Engine, _Parts]:
    from localmim.data.classify import ClassifyShards, build_transform, num_classes_of
    from localmim.train.optim import create_adamw

    dev = dist.device
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
                              world=dist.world_size, seed=cfg.seed)
    val_ds = ClassifyShards(data.val_dir, build_transform(size, train=False), batch_size=cfg.batch_size,
                            train=False, rank=dist.rank, world=dist.world_size)
    eng = Engine(model, wrap_ddp(model, dist), optimizer, Precision.of(cfg.amp, dev), dist)
    schedule = WarmupCosine(cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    ckpts = Checkpoints.of(data.ckpt_dir, "finetune", cfg, dist, encoder=encoder_fingerprint(enc),
                           data=data_fingerprint(data.train_dir))
    return eng, _Parts(schedule, train_ds, val_ds, *build_mixup(cfg, num_classes), ckpts)


def _end_epoch(cfg, eng: Engine, p: _Parts, state: dict, epoch: int, train_loss: float,
               log_fn: LogFn | None) -> None:
    """Evaluate; keep the best weights; log the epoch's row."""
    from localmim.data.classify import make_loader
    from localmim.eval.classify import evaluate

    loader = make_loader(p.val_ds, cfg.num_workers, eng.device.type == "cuda")
    ev = evaluate(eng.model, loader, eng.device, eng.prec.dtype, num_classes=unwrap(eng.model).num_classes)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": p.schedule(epoch + 1), "top1": ev["top1"],
           "top5": ev["top5"], "val_loss": ev["loss"], "val_samples": ev["n"]}
    state["history"].append(row)
    if ev["top1"] > state["best_top1"]:
        state["best_top1"], state["best_epoch"] = ev["top1"], epoch + 1
        if eng.dist.is_main:
            _save_weights(eng.model, p.ckpts.dir / "best.pt")
    if log_fn is not None and eng.dist.is_main:
        log_fn({k: v for k, v in row.items() if k != "epoch"} | {"best_top1": state["best_top1"]}, epoch + 1)


def _recipe(model, enc: EncoderSpec, cfg, state: dict) -> dict[str, Any]:
    """How to rebuild the classifier: ``encoder_io.create_timm_model(timm_name, head, **timm_kwargs)`` (plain timm
    for ``head == 'timm'``; Swin's ``pool_norm`` head swaps timm's per-token norm for a pooled one, method §8.2)."""
    kwargs = dict(enc.timm_kwargs) | {"img_size": cfg.input_size or enc.img_size, "global_pool": "avg",
                                     "num_classes": unwrap(model).num_classes}
    name = enc.timm_name if cfg.model == "auto" else cfg.model
    return {"timm_name": name, "head": classifier_head(name), "timm_kwargs": kwargs, "best_epoch": state["best_epoch"],
            "best_top1": state["best_top1"]}


def _resume(ckpts: Checkpoints, eng: Engine) -> dict[str, Any]:
    """The state of this run's newest checkpoint (weights etc. restored into ``eng``), else a fresh state."""
    payload = ckpts.resume(eng)
    if payload is None:
        return {"epoch": 0, "best_top1": -1.0, "best_epoch": 0, "history": [], "seconds": 0.0}
    return dict(payload["extra"]) | {"epoch": payload["epoch"]}


def _save_weights(model, path: Path) -> None:
    from localmim.utils.io import atomic_torch_save

    atomic_torch_save({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)

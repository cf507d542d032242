"""Semantic-segmentation training loop (method §9.1): UperNet on the exported encoder, iteration-based.

* AdamW with layer-wise lr decay over the encoder (:func:`localmim.models.layer_decay.param_groups_with_decay`;
  neck and heads at the full rate), poly schedule with linear warm-up, set every iteration.
* Loss: cross-entropy (ignore 255) on the decode logits + ``aux_weight`` x the auxiliary head's.
* bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing), fp32 on CPU; DDP under torchrun (BatchNorm
  becomes SyncBatchNorm on CUDA); losses summed on the device and read every ``log_every`` steps.
* Checkpoints (model, optimizer, scaler, every rank's RNG) every ``ckpt_every`` iterations in
  ``ckpt_dir/<run key>``; the data stream is a pure function of the step (:class:`localmim.data.ade20k.StepBatches`),
  so a resumed run is bit-identical to an uninterrupted one on CPU.
* Evaluation every ``eval_every`` iterations and at the end (:func:`localmim.eval.segmentation.evaluate`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from localmim.data.ade20k import IGNORE, Pair, StepBatches, TrainSet, ValSet, train_transform
from localmim.eval.segmentation import evaluate
from localmim.models.encoder_io import EncoderSpec
from localmim.models.layer_decay import param_groups_with_decay
from localmim.models.segmentation import Segmenter, build_segmenter
from localmim.train import checkpoint as ckpt
from localmim.train.optim import create_adamw
from localmim.utils.distributed import DistInfo, amp_dtype, init_distributed, make_scaler

LogFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class PolyWarmup:
    """lr at iteration ``i``: ``(lr - min_lr)(1 - i/iters)^power + min_lr``; during the first ``warmup_iters`` it is
    multiplied by ``1 - (1 - i/warmup_iters)(1 - warmup_ratio)`` (linear from ``warmup_ratio``, MMCV's rule)."""

    lr: float
    iters: int
    power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6

    def __call__(self, i: int) -> float:
        lr = (self.lr - self.min_lr) * (1 - min(i, self.iters) / self.iters) ** self.power + self.min_lr
        if i < self.warmup_iters:
            lr *= 1 - (1 - i / self.warmup_iters) * (1 - self.warmup_ratio)
        return lr

    def apply(self, optimizer: torch.optim.Optimizer, i: int) -> float:
        lr = self(i)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


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


def fingerprint(enc: EncoderSpec, pairs: list[Pair]) -> str:
    """Identity of the encoder weights and the training list (a new one never resumes an old run)."""
    h = hashlib.sha256(enc.timm_name.encode())
    for k in sorted(enc.state_dict):
        t = enc.state_dict[k].detach().float()
        h.update(f"{k}:{t.numel()}:{t.sum().item():.6e}:{t.abs().sum().item():.6e}".encode())
    for p in pairs:
        h.update(f"{p.stem}:{p.image.stat().st_size}:{p.annotation.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _build(cfg, enc: EncoderSpec, dist: DistInfo) -> tuple[Segmenter, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_segmenter(enc, cfg.num_classes, crop_size=cfg.crop_size, channels=cfg.channels,
                            aux_channels=cfg.aux_channels, drop_path=cfg.drop_path, pretrained=cfg.pretrained)
    if dist.distributed and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dist.device)
    groups = param_groups_with_decay(model, model.backbone.encoder, "backbone.encoder.", cfg.weight_decay,
                                     cfg.layer_decay)
    opt = create_adamw(groups, cfg.lr, cfg.weight_decay, tuple(cfg.betas), dist.device)
    net = model
    if dist.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index]
                                                        if dist.device.type == "cuda" else None)
    return model, net, opt


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


def _save(cfg, ckpt_dir: Path, model, opt, scaler, step: int, dist: DistInfo, history: list[dict]) -> Path | None:
    rng = ckpt.all_rng_states()  # collective
    if not dist.is_main:
        return None
    payload = ckpt.make_payload(model=model, optimizer=opt, scaler=scaler, epoch=0, step=step, data_batches=step,
                                rng=rng, params=cfg.to_dict(), extra={"history": history})
    return ckpt.save(ckpt_dir, payload)


def _evaluate(cfg, model, val, dist, dtype, on_pred=None) -> dict:
    return evaluate(model, val, dist.device, cfg.num_classes, mode=inference_mode(cfg, model), crop=cfg.crop_size,
                    stride=cfg.slide_stride, amp_dtype=dtype, on_pred=on_pred)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (``!= 255``); 0, not NaN, when a batch has none."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def _read(sums: torch.Tensor, n: int, world: int) -> list[float]:
    """One host sync: the interval's mean losses (over ranks); raises on a non-finite loss."""
    if world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(sums)
        sums = sums / world
    vals = (sums / max(n, 1)).tolist()
    if not all(v == v and abs(v) != float("inf") for v in vals):
        raise FloatingPointError(f"segment: non-finite training loss {vals}")
    return vals


def _resume(run_dir: Path, model, opt, scaler, dist: DistInfo) -> tuple[int, list[dict], Path | None]:
    """Restore the newest checkpoint of this run, if any: (step, eval history, its path)."""
    last = ckpt.find_latest(run_dir)
    if last is None:
        return 0, [], None
    payload = ckpt.load(last, map_location=dist.device)
    try:
        ckpt.restore(payload, model, opt, scaler, dist.rank, dist.world_size)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{last}: this checkpoint does not fit the model built now ({str(e)[:300]}); "
                         f"remove {run_dir} to start afresh") from None
    if dist.is_main:
        print(f"segment: resumed {last} (step {payload['step']})", flush=True)
    return payload["step"], list(payload["extra"].get("history", [])), last


def _train_step(net, opt, scaler, imgs: torch.Tensor, labels: torch.Tensor, dtype, aux_weight: float) -> torch.Tensor:
    """One optimisation step; returns the detached ``[decode loss, aux loss]`` (no host sync)."""
    with torch.autocast(imgs.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits, aux = net(imgs)  # [B, K, S, S] each
        loss_main = seg_loss(logits, labels)
        loss_aux = seg_loss(aux, labels) if aux is not None else 0 * loss_main
        loss = loss_main + aux_weight * loss_aux
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return torch.stack([loss_main.detach(), loss_aux.detach()])


def run_segment(cfg, enc: EncoderSpec, train_pairs: list[Pair], val_pairs: list[Pair], ckpt_dir: str | Path, *,
                log_fn: LogFn | None = None, on_pred: Callable[[int, torch.Tensor], None] | None = None,
                progress: bool = True) -> SegmentResult:
    """Train UperNet on ``train_pairs`` for ``cfg.iters`` iterations, resuming from ``ckpt_dir`` (see the module
    docstring); the final evaluation on ``val_pairs`` calls ``on_pred(index, pred)`` for every prediction."""
    from tqdm import tqdm

    dist = init_distributed(cfg.device)
    model, net, opt = _build(cfg, enc, dist)
    dtype = amp_dtype(cfg.amp, dist.device)
    scaler = make_scaler(dist.device, dtype)
    key = json.dumps({**cfg.run_key(), "world": dist.world_size, "data": fingerprint(enc, train_pairs)},
                     sort_keys=True)
    run_dir = Path(ckpt_dir) / hashlib.sha256(key.encode()).hexdigest()[:12]
    step, history, last = _resume(run_dir, model, opt, scaler, dist)
    train, val = _loaders(cfg, train_pairs, val_pairs, dist, step)
    sched = PolyWarmup(cfg.lr, cfg.iters, cfg.power, cfg.min_lr, cfg.warmup_iters, cfg.warmup_ratio)
    sums, n, images, summary, eval_s = torch.zeros(2, device=dist.device), 0, 0, {}, 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iters, initial=step, desc="segment", disable=not (progress and dist.is_main),
               dynamic_ncols=True)
    net.train()
    for imgs, labels in train:
        lr = sched.apply(opt, step)
        imgs = imgs.to(dist.device, non_blocking=True)  # uint8 [B, 3, S, S]
        labels = labels.to(dist.device, non_blocking=True).long()  # [B, S, S], 255 = ignore
        sums += _train_step(net, opt, scaler, imgs, labels, dtype, cfg.aux_weight)
        n, images, step = n + 1, images + imgs.shape[0] * dist.world_size, step + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.iters:
            main, aux_l = _read(sums, n, dist.world_size)
            summary = {"loss": main + cfg.aux_weight * aux_l, "loss_decode": main, "loss_aux": aux_l, "lr": lr,
                       "images_per_s": images / max(time.perf_counter() - t0 - eval_s, 1e-9)}
            sums.zero_()
            n = 0
            bar.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{lr:.2e}")
            if dist.is_main and log_fn is not None:
                log_fn(summary, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.iters:
            te = time.perf_counter()
            ev = _evaluate(cfg, model, val, dist, dtype)
            eval_s += time.perf_counter() - te
            history.append({"step": step, "mIoU": ev["mIoU"], "mAcc": ev["mAcc"], "aAcc": ev["aAcc"]})
            if dist.is_main and log_fn is not None:
                log_fn({k: v for k, v in history[-1].items() if k != "step"}, step)
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            last = _save(cfg, run_dir, model, opt, scaler, step, dist, history) or last
    bar.close()
    train_s = time.perf_counter() - t0 - eval_s
    ev = _evaluate(cfg, model, val, dist, dtype, on_pred)
    history.append({"step": step, "mIoU": ev["mIoU"], "mAcc": ev["mAcc"], "aAcc": ev["aAcc"]})
    if dist.is_main and log_fn is not None:
        log_fn({"mIoU": ev["mIoU"], "mAcc": ev["mAcc"], "aAcc": ev["aAcc"]}, step)
    metrics = {**ev, "iters": step, "train_seconds": train_s, "world_size": dist.world_size,
               **{f"final_{k}": v for k, v in summary.items()}}
    return SegmentResult(model, metrics, history, last)

"""Masked-image-modeling pre-training loop (method §7), resumable and distributed.

``run_pretrain(cfg, data_dir, ckpt_dir, log_fn)`` trains a ``localmim.models`` pre-training model (LocalMIM or the
MAE baseline) and returns it with summary metrics. The same function serves the ``pretrain`` stage, the
LocalMIM-vs-MAE benchmark and the tests.

* lr = ``blr × global_batch / 256`` (or ``lr``); accumulation ``global_batch / (batch_size × world_size)``;
  per-iteration warm-up + cosine, set at the
  start of each accumulation cycle; AdamW (``betas``, method §7: 0.9, 0.95) without decay on norms/biases.
* Masking noise from ``seed + rank`` (method §7); the model is built from ``seed`` on every rank.
* The step, AMP, DDP, the non-finite-loss guard and the checkpoint rule are the engine's
  (:mod:`localmim.train.engine`); the run's identity holds the data manifest. Checkpoints every ``ckpt_every``
  epochs and, mid-epoch, every ``ckpt_minutes``; the newest is resumed automatically. On SIGURG / SIGUSR1 / SIGTERM
  (a cluster time limit or preemption) every rank stops at the next logged optimizer step after a checkpoint and
  the stage exits 75 (:mod:`localmim.runtime.preempt`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from localmim.models.encoder_io import build_pretrain_model
from localmim.runtime import preempt
from localmim.runtime.distributed import DistInfo, setup, unwrap, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train.engine import Checkpoints, Engine, LogFn, LossMeter, NonFiniteLossError, data_fingerprint, set_lr
from localmim.train.optim import create_adamw
from localmim.train.schedule import WarmupCosine

__all__ = ["NonFiniteLossError", "PretrainResult", "make_run", "run_pretrain", "train_one_epoch"]


@dataclass
class PretrainResult:
    """The trained (unwrapped) model, summary metrics, the last checkpoint written and the rows the epoch hook
    returned over the whole run (kept in the checkpoints, so a resumed run still has the earlier epochs')."""

    model: torch.nn.Module
    metrics: dict[str, float]
    checkpoint: Path | None
    monitor: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Run:
    cfg: Any
    eng: Engine
    sched: WarmupCosine
    loader: Any
    ckpts: Checkpoints
    log_fn: LogFn
    progress: bool
    step: int = 0  # global iteration (micro-batch) count
    summary: dict[str, float] = field(default_factory=dict)
    monitor: list[dict[str, float]] = field(default_factory=list)  # rows returned by the epoch hook


def _check_views(model: torch.nn.Module, data_dir: Path) -> None:
    from localmim.data.pretrain import read_views_manifest

    man = read_views_manifest(data_dir)
    want = {"target": model.target, "input_size": model.img_size}
    if model.target == "hog":
        want.update(hog_nbins=model.hog_nbins, cells=list(model.target_cells))
    bad = {k: (man.get(k), v) for k, v in want.items() if man.get(k) != v}
    if bad:
        detail = ", ".join(f"{k}: views {a} vs model {b}" for k, (a, b) in bad.items())
        raise ValueError(f"{data_dir}: view shards do not match the model ({detail}); re-run `localmim targets`")


def _setup(cfg, data_dir: Path, ckpt_dir: Path, log_fn: LogFn | None, progress: bool, dist: DistInfo | None) -> _Run:
    from localmim.data.pretrain import PretrainLoader, PretrainStream

    dist = setup(cfg.device, dist)
    ds = PretrainStream(data_dir, input_size=cfg.input_size, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, rank=dist.rank,
                        world=dist.world_size, views=cfg.data == "views")
    loader = PretrainLoader(ds, cfg.num_workers, pin_memory=cfg.pin_memory and dist.device.type == "cuda")
    accum = cfg.accum_for(dist.world_size)
    if len(loader) < accum:
        raise ValueError(f"{len(loader)} batches per epoch is fewer than the accumulation {accum}")
    ckpts = Checkpoints.of(ckpt_dir, "pretrain", cfg, dist, data=data_fingerprint(data_dir))
    run = make_run(cfg, dist, loader, ckpts, log_fn, progress)
    if cfg.data == "views":
        _check_views(run.eng.model, data_dir)
    return run


def make_run(cfg, dist: DistInfo, loader, ckpts: Checkpoints, log_fn: LogFn | None = None,
             progress: bool = False) -> _Run:
    """Model (seeded ``cfg.seed``), AdamW, precision, schedule and DDP wrapper around a batch source ``loader``
    (``len(loader)`` batches per epoch, ``loader.epoch(epoch, skip)`` yields them): what :func:`train_one_epoch`
    runs. Leaves the global RNG at ``cfg.seed + rank``, the masking noise seed (method §7)."""
    seed_everything(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = build_pretrain_model(cfg).to(dist.device)
    opt = create_adamw(model, cfg.peak_lr(), cfg.weight_decay, tuple(cfg.betas), dist.device)
    net = torch.compile(model) if cfg.compile else model
    # Buffers (fixed sin-cos, frozen HOG biases) never change after DDP's initial sync: no per-forward sync.
    net = wrap_ddp(net, dist, forward_sync_buffers=False)
    seed_everything(cfg.seed + dist.rank)  # masking noise: seed + rank (method §7)
    sched = WarmupCosine(cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    eng = Engine(model, net, opt, Precision.of(cfg.amp, dist.device), dist)
    return _Run(cfg, eng, sched, loader, ckpts, log_fn or (lambda m, s: None), progress)


def _save(run: _Run, epoch: int, batches: int) -> None:
    """Checkpoint at data position (epoch, batches), with the schedule position and the latest summary."""
    at = epoch + batches / len(run.loader)
    sched = {"lr": run.sched.lr, "min_lr": run.sched.min_lr, "warmup_epochs": run.sched.warmup_epochs,
             "epochs": run.sched.epochs, "at_epoch": at, "lr_at": run.sched(at)}
    extra = {"summary": run.summary, "schedule": sched, "world_size": run.eng.dist.world_size, "monitor": run.monitor}
    run.ckpts.save(run.eng, epoch=epoch, step=run.step, batches=batches, extra=extra)


def _resume(run: _Run) -> tuple[int, int]:
    """Restore the newest checkpoint of this run, if any; returns (epoch, batches already done in it)."""
    payload = run.ckpts.resume(run.eng)
    if payload is None:
        return 0, 0
    run.step, run.summary = payload["step"], dict(payload["extra"].get("summary", {}))
    run.monitor = list(payload["extra"].get("monitor", []))
    return payload["data"]["epoch"], payload["data"]["batches"]


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_one_epoch(run: _Run, epoch: int, skip: int = 0) -> dict[str, float]:
    """One epoch (from batch ``skip``); returns the last interval's metrics."""
    from tqdm import tqdm

    from localmim.data.views import targets_from_finest

    cfg, eng, model, steps = run.cfg, run.eng, run.eng.model, len(run.loader)
    names = ["loss", *(f"loss_{n}" for n in model.loss_names)]
    meter, accum, out = LossMeter("pretrain", names, eng.device, run.ckpts), cfg.accum_for(eng.dist.world_size), {}
    bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch}", disable=not (run.progress and eng.dist.is_main),
               dynamic_ncols=True, leave=False)
    batches = iter(run.loader.epoch(epoch, skip=skip))
    for it in range(skip, steps):
        t = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"epoch {epoch}: data ended after {it} of {steps} batches (shard manifest counts "
                               f"do not match the tars?)")
        meter.wait += time.perf_counter() - t
        images, finest = batch if isinstance(batch, tuple) else (batch, None)
        images = images.to(eng.device, non_blocking=True)  # uint8 [B, 3, S, S]
        targets = None if finest is None else targets_from_finest(finest.to(eng.device, non_blocking=True),
                                                                   model.hog_nbins, model.target_cells)
        if it % accum == 0:  # lr per accumulation cycle, at the fractional epoch
            lr = set_lr(eng.opt, run.sched(epoch + it / steps))
        forward = partial(eng.net, images, mask_ratio=cfg.mask_ratio, targets=targets)
        loss, per_tap, _ = eng.step(forward, it=it, accum=accum, steps=steps)
        meter.add([loss, *(per_tap[n] for n in model.loss_names)], run.step, images.shape[0])
        run.step += 1
        bar.update(1)
        if run.step % cfg.log_every == 0 or it + 1 == steps:
            out = meter.read(eng.dist.world_size, epoch=epoch)
            out.update(peak_mem_mb=_peak_mb(eng.device), lr=lr, epoch=epoch + (it + 1) / steps)
            bar.set_postfix(loss=f"{out['loss']:.4f}", img_s=f"{out['images_per_s']:.1f}")
            if eng.dist.is_main:
                run.log_fn(out, int((epoch + (it + 1) / steps) * 1000))  # x-axis epoch_1000x, as in MAE
            cycle_done = (it + 1) % accum == 0
            if cycle_done and it + 1 < steps and preempt.stop_requested(eng.dist):  # [preempt] collective, at a sync
                _save(run, epoch, it + 1)
                preempt.stop(eng.dist, f"epoch {epoch} batch {it + 1} (step {run.step})", run.ckpts.last)
            if cycle_done and it + 1 < steps and _minutes_due(run):
                _save(run, epoch, it + 1)
    bar.close()
    return out


def _minutes_due(run: _Run) -> bool:
    """Whether a time-based checkpoint is due, decided by rank 0 and shared (all ranks must save together)."""
    if run.cfg.ckpt_minutes <= 0:
        return False
    due = torch.tensor(float(time.monotonic() - run.ckpts.saved_at >= 60 * run.cfg.ckpt_minutes))
    if run.eng.dist.distributed:
        import torch.distributed as tdist

        due = due.to(run.eng.device)
        tdist.broadcast(due, src=0)
    return bool(due.item())


def run_pretrain(cfg, data_dir: str | Path, ckpt_dir: str | Path, log_fn: LogFn | None = None, *,
                 on_epoch_end: Callable[[int, torch.nn.Module], None] | None = None, progress: bool = True,
                 dist: DistInfo | None = None) -> PretrainResult:
    """Pre-train per ``cfg`` (a ``PretrainConfig``) on ``data_dir`` (raw train shards, or view shards when
    ``cfg.data == 'views'``), resuming from ``ckpt_dir`` automatically.

    Args:
        cfg: resolved ``pretrain`` params.
        data_dir: shard directory for ``cfg.data``.
        ckpt_dir: checkpoint root (each run uses its own keyed sub-directory).
        log_fn: ``log_fn(metrics, epoch_1000x)`` on rank 0 every ``cfg.log_every`` steps: ``loss``, ``loss_<tap>``,
            ``lr``, ``epoch``, ``images_per_s`` (end-to-end), ``images_per_s_compute``, ``data_wait_frac``,
            ``peak_mem_mb``.
        on_epoch_end: ``fn(epoch, model)`` after each epoch, before its checkpoint, on every rank; a dict it
            returns is kept in ``PretrainResult.monitor`` and in the checkpoints (rank 0's).
        progress: show a tqdm bar on rank 0.
        dist: the process group the stage started (default: started here from torchrun's environment).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the message names the step and the last good checkpoint).
        ValueError: inconsistent params/data (e.g. view shards built for another model).
    """
    run = _setup(cfg, Path(data_dir), Path(ckpt_dir), log_fn, progress, dist)
    start_epoch, skip = _resume(run)
    t0 = time.perf_counter()
    with preempt.handlers():  # [preempt] SIGURG / SIGUSR1 / SIGTERM set the flag the loop checks after a step
        for epoch in range(start_epoch, cfg.epochs):
            last = train_one_epoch(run, epoch, skip if epoch == start_epoch else 0)
            run.summary = {**{f"final_{k}": v for k, v in last.items()}, "epochs_done": epoch + 1, "steps": run.step}
            if on_epoch_end is not None and (row := on_epoch_end(epoch, run.eng.model)):
                run.monitor.append(dict(row))
            if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
                _save(run, epoch + 1, 0)
            if epoch + 1 < cfg.epochs and preempt.stop_requested(run.eng.dist):  # [preempt] between epochs
                if (epoch + 1) % cfg.ckpt_every:
                    _save(run, epoch + 1, 0)
                preempt.stop(run.eng.dist, f"the end of epoch {epoch} (step {run.step})", run.ckpts.last)
    metrics = {**run.summary, "train_seconds": time.perf_counter() - t0, "world_size": run.eng.dist.world_size,
               "peak_lr": run.sched.lr, "steps_per_epoch": len(run.loader)}
    return PretrainResult(unwrap(run.eng.net), metrics, run.ckpts.last, run.monitor)

"""Masked-image-modeling pre-training loop (method §7), resumable and distributed.

``run_pretrain(cfg, data_dir, ckpt_dir, log_fn)`` trains a ``localmim.models`` pre-training model (LocalMIM or the
MAE baseline) and returns it with summary metrics. The same function serves the ``pretrain`` stage, the
LocalMIM-vs-MAE benchmark and the tests.

* lr = ``blr × batch_size × accum_iter × world_size / 256`` (or ``lr``), per-iteration warm-up + cosine, updated
  at the start of each accumulation cycle; AdamW (0.9, 0.95) without decay on norms/biases; loss / (micro-batches in
  the cycle: accum_iter, or fewer in the last cycle of an epoch); backward outside autocast.
* Device auto-detect; bf16 autocast on CUDA (fp16 + loss scaling where bf16 is unsupported; ``amp``), fp32 on
  CPU; DDP under torchrun (gloo on CPU, NCCL on CUDA); rank 0 logs and saves.
* No host syncs in the hot loop: losses are summed on the device and read every ``log_every`` steps; the first
  non-finite loss is recorded on the device and raised (naming its step) at the next read, which always comes
  before a checkpoint is written, so the last checkpoint on disk is a good one.
* Checkpoints in ``ckpt_dir/<run key>`` (the key hashes the params that define the run, the world size and the
  data manifest, so a changed config never resumes a stale run) every ``ckpt_every`` epochs and every
  ``ckpt_minutes``; the newest is resumed automatically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from localmim.train import checkpoint as ckpt
from localmim.train.optim import create_adamw
from localmim.train.schedule import WarmupCosine, cycle_length
from localmim.utils.distributed import DistInfo, amp_dtype, init_distributed, make_scaler, unwrap
from localmim.utils.io import is_run_metadata

LogFn = Callable[[dict[str, float], int], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


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
    dist: DistInfo
    model: torch.nn.Module  # bare module (state dicts, export)
    net: torch.nn.Module  # what is called: DDP and/or compiled wrapper
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sched: WarmupCosine
    loader: Any
    amp_dtype: torch.dtype | None
    ckpt_dir: Path
    log_fn: LogFn
    progress: bool
    step: int = 0  # global iteration (micro-batch) count
    last_ckpt: Path | None = None
    last_ckpt_time: float = field(default_factory=time.monotonic)
    summary: dict[str, float] = field(default_factory=dict)
    monitor: list[dict[str, float]] = field(default_factory=list)  # rows returned by the epoch hook


def build_model(cfg, device: torch.device | None = None) -> torch.nn.Module:
    """``localmim.models.create(cfg.model, ...)``, checked against ``cfg.mode``; timm attention fused per
    ``cfg.fused_attn`` (``auto``: timm's default; timm reads the flag when a block is built)."""
    import timm.layers

    from localmim.models import create

    before = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(before if cfg.fused_attn == "auto" else cfg.fused_attn == "on")
    try:
        model = create(cfg.model, **cfg.model_overrides())
    finally:
        timm.layers.set_fused_attn(before)
    if cfg.mode != "auto" and model.mode != cfg.mode:
        raise ValueError(f"pretrain.mode={cfg.mode!r} but model {cfg.model!r} is a {model.mode!r} model")
    return model


def data_fingerprint(data_dir: str | Path) -> str:
    """Hash of the data manifests in ``data_dir`` (shard or views manifest), so new data never resumes old runs.
    Lineage files are not data: a rerun of the shard stage that wrote the same shards resumes the same run."""
    d = Path(data_dir)
    files = [f for f in sorted(d.glob("*.json")) if not is_run_metadata(f)] or sorted(d.glob("*.tar"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def run_key(cfg, world_size: int, data_dir: str | Path) -> str:
    """Checkpoint sub-directory name: hash of what defines the run (not runtime knobs like num_workers)."""
    blob = json.dumps({**cfg.run_key(), "world_size": world_size, "data": data_fingerprint(data_dir)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


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


def _setup(cfg, data_dir: Path, ckpt_dir: Path, log_fn: LogFn | None, progress: bool) -> _Run:
    from localmim.data.pretrain import PretrainLoader, PretrainStream

    dist = init_distributed(cfg.device)
    ds = PretrainStream(data_dir, input_size=cfg.input_size, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, rank=dist.rank,
                        world=dist.world_size, views=cfg.data == "views")
    loader = PretrainLoader(ds, cfg.num_workers, pin_memory=cfg.pin_memory and dist.device.type == "cuda")
    if len(loader) < cfg.accum_iter:
        raise ValueError(f"{len(loader)} batches per epoch is fewer than accum_iter={cfg.accum_iter}")
    run = make_run(cfg, dist, loader, Path(ckpt_dir) / run_key(cfg, dist.world_size, data_dir), log_fn, progress)
    if cfg.data == "views":
        _check_views(run.model, data_dir)
    return run


def make_run(cfg, dist: DistInfo, loader, ckpt_dir: Path, log_fn: LogFn | None = None,
             progress: bool = False) -> _Run:
    """Model (seeded ``cfg.seed``), AdamW, loss scaler, schedule and DDP wrapper around a batch source ``loader``
    (``len(loader)`` batches per epoch, ``loader.epoch(epoch, skip)`` yields them): what :func:`train_one_epoch`
    runs. Leaves the global RNG at ``cfg.seed + rank``, the masking noise seed (method §7)."""
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(cfg, dist.device).to(dist.device)
    opt = create_adamw(model, cfg.peak_lr(dist.world_size), cfg.weight_decay, tuple(cfg.betas), dist.device)
    dtype = amp_dtype(cfg.amp, dist.device)
    net = torch.compile(model) if cfg.compile else model
    if dist.distributed:
        # Buffers (fixed sin-cos, frozen HOG biases) never change after DDP's initial sync: no per-forward sync.
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)
    torch.manual_seed(cfg.seed + dist.rank)  # masking noise: seed + rank (method §7)
    sched = WarmupCosine(cfg.peak_lr(dist.world_size), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    return _Run(cfg, dist, model, net, opt, make_scaler(dist.device, dtype), sched, loader, dtype, ckpt_dir,
                log_fn or (lambda m, s: None), progress)


def _save(run: _Run, epoch: int, batches: int) -> None:
    """Checkpoint (collective: every rank contributes its RNG state; rank 0 writes)."""
    payload_rng = ckpt.all_rng_states()
    if run.dist.is_main:
        payload = ckpt.make_payload(model=run.model, optimizer=run.opt, scaler=run.scaler, epoch=epoch,
                                    step=run.step, data_batches=batches, rng=payload_rng,
                                    params=run.cfg.to_dict(), extra=_extra(run, epoch, batches))
        run.last_ckpt = ckpt.save(run.ckpt_dir, payload)
    run.last_ckpt_time = time.monotonic()


def _extra(run: _Run, epoch: int, batches: int) -> dict:
    """Schedule position and the latest summary, stored with the checkpoint."""
    at = epoch + batches / len(run.loader)
    sched = {"lr": run.sched.lr, "min_lr": run.sched.min_lr, "warmup_epochs": run.sched.warmup_epochs,
             "epochs": run.sched.epochs, "at_epoch": at, "lr_at": run.sched(at)}
    return {"summary": run.summary, "schedule": sched, "world_size": run.dist.world_size, "monitor": run.monitor}


def _resume(run: _Run) -> tuple[int, int]:
    """Restore the newest checkpoint of this run, if any; returns (epoch, batches already done in it)."""
    path = ckpt.find_latest(run.ckpt_dir)
    if path is None:
        return 0, 0
    payload = ckpt.load(path, map_location=run.dist.device)
    ckpt.restore(payload, run.model, run.opt, run.scaler, run.dist.rank, run.dist.world_size)
    run.step, run.last_ckpt, run.summary = payload["step"], path, dict(payload["extra"].get("summary", {}))
    run.monitor = list(payload["extra"].get("monitor", []))
    if run.dist.is_main:
        print(f"pretrain: resumed {path} (epoch {payload['data']['epoch']}, step {run.step})", flush=True)
    return payload["data"]["epoch"], payload["data"]["batches"]


class _Meter:
    """Device-side sums of the losses since the last read, plus host-side timers; one sync per read."""

    def __init__(self, names: list[str], device: torch.device):
        self.names, self.device = names, device
        self.first_bad = torch.full((), -1.0, device=device)  # first non-finite step (-1: none)
        self.step_t = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(1 + len(self.names), device=self.device)  # [total, per tap...]
        self.n, self.images, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, per_tap: dict[str, torch.Tensor], step: int, images: int) -> None:
        vals = torch.stack([loss.detach().float(), *(per_tap[n].float() for n in self.names)])  # [1 + taps]
        self.step_t.fill_(step)
        bad = ~torch.isfinite(vals[0]) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, self.step_t, self.first_bad)
        self.sums += vals
        self.n, self.images = self.n + 1, self.images + images

    def read(self, epoch: int, world: int, last_ckpt: Path | None) -> dict[str, float]:
        """Sync once; raise on a non-finite loss; return the interval's means and throughput."""
        sums, bad = self.sums.clone(), self.first_bad.clone()
        if world > 1:  # every rank stops together, and the logged losses are means over ranks
            import torch.distributed as tdist

            tdist.all_reduce(sums)
            tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
            sums /= world
        vals = torch.cat([sums, bad.view(1)]).tolist()
        if vals[-1] >= 0:
            raise NonFiniteLossError(f"non-finite loss at step {int(vals[-1])} (epoch {epoch}); stopping. Last good "
                                     f"checkpoint: {last_ckpt or 'none (no checkpoint written yet)'}")
        wall = max(time.perf_counter() - self.t0, 1e-9)
        out = {"loss": vals[0] / max(self.n, 1), **{f"loss_{n}": v / max(self.n, 1) for n, v in
                                                    zip(self.names, vals[1:-1], strict=True)}}
        out.update(images_per_s=self.images * world / wall, data_wait_frac=self.wait / wall,
                   images_per_s_compute=self.images * world / max(wall - self.wait, 1e-9), peak_mem_mb=_peak_mb(
                       self.device))
        self.reset()
        return out


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_one_epoch(run: _Run, epoch: int, skip: int = 0) -> dict[str, float]:
    """One epoch (from batch ``skip``); returns the last interval's metrics."""
    from tqdm import tqdm

    from localmim.data.views import targets_from_finest

    cfg, dev, model, steps = run.cfg, run.dist.device, run.model, len(run.loader)
    meter, accum, out = _Meter(list(model.loss_names), dev), cfg.accum_iter, {}
    bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch}", disable=not (run.progress and run.dist.is_main),
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
        images = images.to(dev, non_blocking=True)  # uint8 [B, 3, S, S]
        targets = None if finest is None else targets_from_finest(finest.to(dev, non_blocking=True),
                                                                   model.hog_nbins, model.target_cells)
        if it % accum == 0:  # lr per accumulation cycle, at the fractional epoch
            lr = run.sched.apply(run.opt, epoch + it / steps)
        last_micro = (it + 1) % accum == 0 or it + 1 == steps
        sync = contextlib.nullcontext() if last_micro or not run.dist.distributed else run.net.no_sync()
        with sync:
            with torch.autocast(dev.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
                loss, per_tap, _ = run.net(images, mask_ratio=cfg.mask_ratio, targets=targets)
            run.scaler.scale(loss / cycle_length(it, accum, steps)).backward()  # backward outside autocast
        if last_micro:
            run.scaler.step(run.opt)
            run.scaler.update()
            run.opt.zero_grad(set_to_none=True)
        meter.add(loss, per_tap, run.step, images.shape[0])
        run.step += 1
        bar.update(1)
        if run.step % cfg.log_every == 0 or it + 1 == steps:
            out = meter.read(epoch, run.dist.world_size, run.last_ckpt)
            out.update(lr=lr, epoch=epoch + (it + 1) / steps)
            bar.set_postfix(loss=f"{out['loss']:.4f}", img_s=f"{out['images_per_s']:.1f}")
            if run.dist.is_main:
                run.log_fn(out, int((epoch + (it + 1) / steps) * 1000))  # x-axis epoch_1000x, as in MAE
            if last_micro and it + 1 < steps and _minutes_due(run):
                _save(run, epoch, it + 1)
    bar.close()
    return out


def _minutes_due(run: _Run) -> bool:
    """Whether a time-based checkpoint is due, decided by rank 0 and shared (all ranks must save together)."""
    if run.cfg.ckpt_minutes <= 0:
        return False
    due = torch.tensor(float(time.monotonic() - run.last_ckpt_time >= 60 * run.cfg.ckpt_minutes))
    if run.dist.distributed:
        import torch.distributed as tdist

        due = due.to(run.dist.device)
        tdist.broadcast(due, src=0)
    return bool(due.item())


def run_pretrain(cfg, data_dir: str | Path, ckpt_dir: str | Path, log_fn: LogFn | None = None, *,
                 on_epoch_end: Callable[[int, torch.nn.Module], None] | None = None,
                 progress: bool = True) -> PretrainResult:
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

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the message names the step and the last good checkpoint).
        ValueError: inconsistent params/data (e.g. view shards built for another model).
    """
    run = _setup(cfg, Path(data_dir), Path(ckpt_dir), log_fn, progress)
    start_epoch, skip = _resume(run)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        last = train_one_epoch(run, epoch, skip if epoch == start_epoch else 0)
        run.summary = {**{f"final_{k}": v for k, v in last.items()}, "epochs_done": epoch + 1, "steps": run.step}
        if on_epoch_end is not None and (row := on_epoch_end(epoch, run.model)):
            run.monitor.append(dict(row))
        if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs:
            _save(run, epoch + 1, 0)
    metrics = {**run.summary, "train_seconds": time.perf_counter() - t0, "world_size": run.dist.world_size,
               "peak_lr": run.sched.lr, "steps_per_epoch": len(run.loader)}
    return PretrainResult(unwrap(run.net), metrics, run.last_ckpt, run.monitor)

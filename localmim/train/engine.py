"""The one training engine under every loop (pretrain, finetune, linprobe, segment, detect).

What every loop steps with is written here once; seeding, the process group, the DDP wrap and precision are the
runtime room's (:mod:`localmim.runtime`):

* :meth:`Engine.step`: one micro-batch: the forward under autocast, the backward of ``loss / cycle length`` outside
  it, and on the last micro-batch of an accumulation cycle the scaler step, its update and
  ``zero_grad(set_to_none=True)``: gradients are cleared right after they are used, never before a backward.
  Under DDP gradients are all-reduced on that last micro-batch only.
* :func:`set_lr`: the schedule's lr times each param group's ``lr_scale`` (layer-wise decay).
* :class:`LossMeter`: losses summed on the device (no host sync in the hot loop) with the first non-finite step;
  :meth:`LossMeter.read` syncs once and raises :class:`NonFiniteLossError` naming the stage, the step and the last
  good checkpoint (reads come before every checkpoint, so a checkpoint on disk never holds a diverged model).
* The checkpoint identity rule (:func:`run_identity`, :class:`Checkpoints`): a run is what it computes: the params
  that define it (``cfg.run_key()``: everything but runtime knobs), the encoder it starts from
  (:func:`encoder_fingerprint`), its training data (a fingerprint the loop supplies, e.g. :func:`data_fingerprint`)
  and, for a stage without a global batch, the world size. Its checkpoints live in ``ckpt_root/<hash of the
  identity>``: a run resumes only its own checkpoints (the newest, automatically), and a changed run starts afresh
  in its own directory, leaving the other run's intact. A checkpoint there that does not fit (another identity
  stored, or weights the model built now rejects) is an error naming the file and the directory to remove.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from localmim.runtime import checkpoint as ckpt
from localmim.runtime.distributed import DistInfo
from localmim.runtime.precision import Precision
from localmim.utils.io import is_run_metadata

LogFn = Callable[[dict[str, float], int], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------ the step


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every param group's lr to ``lr · group['lr_scale']`` (default scale 1); returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def cycle_length(it: int, accum: int, steps: int) -> int:
    """Micro-batches in the accumulation cycle holding batch ``it`` of an epoch of ``steps``: ``accum``, except
    for a shorter last cycle. The loss is divided by it, so every optimizer step sees the mean micro-batch gradient
    (``accum_iter=k, batch b`` steps like ``accum_iter=1, batch k*b``, also at the end of an epoch)."""
    start = it - it % accum
    return min(accum, steps - start)


@dataclass
class Engine:
    """What a loop trains with: the bare model (state dicts, evaluation), the module that is called (DDP and/or
    compiled wrapper), the optimizer, the precision and the process's place."""

    model: torch.nn.Module
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    prec: Precision
    dist: DistInfo

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def step(self, forward: Callable[[], Any], *, it: int = 0, accum: int = 1, steps: int = 1) -> Any:
        """Micro-batch ``it`` of ``steps``: ``out = forward()`` under autocast (``out`` is the loss or a tuple whose
        first item is), backward of ``loss / cycle_length`` outside autocast, and the optimizer step when the
        accumulation cycle ends (``(it + 1) % accum == 0`` or the last batch). Returns ``out``."""
        last = (it + 1) % accum == 0 or it + 1 == steps
        sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
        with sync:
            with self.prec.autocast():
                out = forward()
            loss = out[0] if isinstance(out, tuple) else out
            self.prec.scaler.scale(loss / cycle_length(it, accum, steps)).backward()
        if last:
            self.prec.scaler.step(self.opt)
            self.prec.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        return out


# ------------------------------------------------------------------------------------------- the loss guard


class LossMeter:
    """Device-side sums of named losses since the last read, the first non-finite step, images and wall time;
    ``ckpts`` (the run's :class:`Checkpoints`) names the last good checkpoint when a loss goes non-finite."""

    def __init__(self, stage: str, names: list[str], device: torch.device, ckpts: Checkpoints | None = None):
        self.stage, self.names, self.device, self.ckpts = stage, list(names), device, ckpts
        self.first_bad = torch.full((), -1.0, device=device)  # first step with a non-finite loss (-1: none)
        self._step = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        """Start a fresh interval now."""
        self.sums = torch.zeros(len(self.names), device=self.device)  # [losses]
        self.n, self.images, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()

    def waited(self, seconds: float) -> None:
        """Time of this interval spent waiting for data (``data_wait_frac``)."""
        self.wait += seconds

    def paused(self, seconds: float) -> None:
        """Time of this interval that was not training (evaluation, checkpoints): left out of its wall time."""
        self.t0 += seconds

    def add(self, losses: list[torch.Tensor], step: int, images: int = 0) -> None:
        """Add one step's losses (scalars, in ``names`` order) and this rank's image count; no host sync."""
        vals = torch.stack([v.detach().float() for v in losses])  # [losses]
        self._step.fill_(step)
        bad = ~torch.isfinite(vals).all() & (self.first_bad < 0)
        self.first_bad = torch.where(bad, self._step, self.first_bad)
        self.sums += vals
        self.n, self.images = self.n + 1, self.images + images

    def read(self, world: int, *, epoch: int | None = None) -> dict[str, float]:
        """One sync (and an all-reduce under DDP, so every rank stops together): the interval's mean losses (over
        ranks), ``images_per_s`` (all ranks) and ``data_wait_frac``; then a fresh interval. The interval's training
        seconds and images (all ranks) stay in ``interval_seconds`` / ``interval_images`` until the next read.

        Raises:
            NonFiniteLossError: a loss was NaN/inf in the interval (on any rank).
        """
        sums, bad = self.sums.clone(), self.first_bad.clone()
        if world > 1:
            import torch.distributed as tdist

            tdist.all_reduce(sums)
            tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
            sums /= world
        vals = torch.cat([sums, bad.view(1)]).tolist()
        if vals[-1] >= 0:
            where = f" (epoch {epoch})" if epoch is not None else ""
            last = self.ckpts.last if self.ckpts is not None else None
            raise NonFiniteLossError(f"{self.stage}: non-finite loss at step {int(vals[-1])}{where}; stopping. Last "
                                     f"good checkpoint: {last or 'none (no checkpoint written yet)'}")
        wall = max(time.perf_counter() - self.t0, 1e-9)
        out = {n: v / max(self.n, 1) for n, v in zip(self.names, vals[:-1], strict=True)}
        out.update(images_per_s=self.images * world / wall, data_wait_frac=self.wait / wall,
                   images_per_s_compute=self.images * world / max(wall - self.wait, 1e-9))
        self.interval_seconds, self.interval_images = wall, self.images * world
        self.reset()
        return out


# ------------------------------------------------------------------------------------- checkpoint identity


def encoder_fingerprint(enc) -> str:
    """Identity of an exported encoder (``EncoderSpec``): its timm name and kwargs and every weight's bytes."""
    h = hashlib.sha256(json.dumps([enc.timm_name, enc.timm_kwargs], sort_keys=True, default=str).encode())
    for k in sorted(enc.state_dict):
        t = enc.state_dict[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(enc.state_dict[k].shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def data_fingerprint(data_dir: str | Path) -> str:
    """Identity of a shard directory: its manifests (``*.json``; without any, the tar names and sizes). Lineage
    files are not data: a rerun of the shard stage that wrote the same shards resumes the same run."""
    d = Path(data_dir)
    files = [f for f in sorted(d.glob("*.json")) if not is_run_metadata(f)] or sorted(d.glob("*.tar"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def run_identity(stage: str, cfg, world_size: int, *, encoder: str | None = None,
                 data: str | None = None) -> dict[str, Any]:
    """What makes a checkpoint resumable: the stage, ``cfg.run_key()``, the encoder and data fingerprints, and the
    world size where it changes what is computed: a section with a ``global_batch`` (every training stage's) computes
    the same on any world size (the accumulation absorbs it), one with only a per-device batch would not."""
    world = None if hasattr(cfg, "global_batch") else world_size
    return {"stage": stage, "params": cfg.run_key(), "encoder": encoder, "data": data, "world_size": world}


def run_key(identity: dict[str, Any]) -> str:
    """The run's checkpoint sub-directory: a short hash of its identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Checkpoints:
    """The checkpoints of one run, in ``root/<run_key(identity)>`` (module docstring: the identity rule), each
    holding the resolved ``params`` too (what rebuilds the model)."""

    root: str | Path
    identity: dict[str, Any]
    params: dict[str, Any]
    keep: int = 2
    last: Path | None = None  # the newest checkpoint written or resumed
    saved_at: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, root: str | Path, stage: str, cfg, dist: DistInfo, *, encoder: str | None = None,
           data: str | None = None) -> Checkpoints:
        """The checkpoints of the run ``cfg`` defines (with its encoder and data fingerprints) at this world size."""
        return cls(root, run_identity(stage, cfg, dist.world_size, encoder=encoder, data=data), cfg.to_dict())

    @property
    def dir(self) -> Path:
        return Path(self.root) / run_key(self.identity)

    @property
    def stage(self) -> str:
        return self.identity["stage"]

    def resume(self, eng: Engine) -> dict[str, Any] | None:
        """Restore the newest checkpoint of this run into ``eng`` (weights, optimizer, scaler, this rank's RNG);
        returns its payload, or None when the run has none.

        Raises:
            ValueError: the checkpoint belongs to another run or does not fit the model built now.
        """
        path = ckpt.find_latest(self.dir)
        if path is None:
            return None
        payload = ckpt.load(path, map_location=eng.device)
        if payload.get("identity") != self.identity:
            raise ValueError(f"{path}: made for another run than this one (stored identity differs); remove "
                             f"{self.dir} to start afresh")
        try:
            ckpt.restore(payload, eng.model, eng.opt, eng.prec.scaler, eng.dist.rank, eng.dist.world_size)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: does not fit the model built now ({str(e)[:300]}); remove {self.dir} to "
                             f"start afresh") from None
        self.last = path
        if eng.dist.is_main:
            print(f"{self.stage}: resumed from {path} (epoch {payload['epoch']}, step {payload['step']})", flush=True)
        return payload

    def save(self, eng: Engine, *, epoch: int, step: int, batches: int = 0,
             extra: dict[str, Any] | None = None) -> Path | None:
        """Write a checkpoint (a collective: every rank contributes its RNG state; rank 0 writes); ``epoch`` and
        ``batches`` are the data position to resume from, ``extra`` the loop's own state (history, summary)."""
        rng = ckpt.all_rng_states()
        self.saved_at = time.monotonic()
        if not eng.dist.is_main:
            return None
        payload = ckpt.make_payload(model=eng.model, optimizer=eng.opt, scaler=eng.prec.scaler, epoch=epoch,
                                    step=step, data_batches=batches, rng=rng, params=self.params, extra=extra,
                                    identity=self.identity)
        self.last = ckpt.save(self.dir, payload, keep=self.keep)
        return self.last

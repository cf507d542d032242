"""The one training loop skeleton under every training stage (pretrain, finetune, linprobe, segment, detect).

A stage's loop is a :class:`Method` (what is learned, from which batches, how it is scored) run by :func:`run`,
which owns everything else, once:

* the step: micro-batches in accumulation cycles of ``plan.accum`` (:meth:`~localmim.train.engine.Engine.step`), the
  lr set at the start of every cycle from the optimizer step and the fractional epoch (``schedule(step, epoch)``);
* cadence: losses read every ``log_every`` optimizer steps and at the end of every epoch (the one host sync, with
  the non-finite guard), evaluation every ``eval_every`` and checkpoints every ``ckpt_every`` units (epochs or
  steps) and at the end, and mid-epoch checkpoints every ``ckpt_minutes`` (decided at a log point by rank 0, so that
  every rank saves together) or when the cluster asks the job to stop (:mod:`localmim.runtime.preempt`);
* measures: data-wait time, images per second (end to end and compute only), peak memory, a progress bar with rates;
* resume: one :class:`LoopState` (epoch, optimizer step, position in the epoch, evaluation history, last losses,
  counters) in every checkpoint, with the method's own state and the data position it reports; the newest
  checkpoint of the run is resumed automatically (:class:`~localmim.train.engine.Checkpoints`);
* the MLflow step unit: every metric is logged at the optimizer step, with ``epoch`` (fractional) as a second axis.

Invariant: a checkpoint is written only at an optimizer-step boundary (no gradient pending), after the losses of the
interval were read (a checkpoint never holds a diverged model), and every rank takes part (RNG states and the data
position are gathered).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from localmim.runtime import preempt
from localmim.train.engine import Checkpoints, Engine, LogFn, LossMeter

Schedule = Callable[[int, float], float]  # (optimizer step, fractional epoch) -> lr, set on the optimizer


@dataclass
class Cadence:
    """When a loop logs, evaluates and checkpoints. ``eval_every`` / ``ckpt_every`` count ``unit``s (0: never, besides
    the end of the run); ``log_every`` counts optimizer steps; ``ckpt_minutes`` (0: off) adds mid-epoch checkpoints."""

    unit: Literal["epoch", "step"] = "epoch"
    log_every: int = 1
    eval_every: int = 0
    ckpt_every: int = 1
    ckpt_minutes: float = 0.0

    @classmethod
    def of(cls, cfg, unit: Literal["epoch", "step"], eval_every: int) -> Cadence:
        """A stage section's cadence: its ``log_every``, ``ckpt_every`` and ``ckpt_minutes`` (the defaults where it
        has none)."""
        return cls(unit, getattr(cfg, "log_every", 1), eval_every, getattr(cfg, "ckpt_every", 1),
                   getattr(cfg, "ckpt_minutes", 0.0))


@dataclass
class Plan:
    """The shape of a run: ``epochs`` of ``steps`` optimizer steps (an iteration-based run: 1 epoch of ``iters``), each
    ``accum`` micro-batches on every rank; ``losses`` names what :meth:`Method.loss` returns (the first is the one
    back-propagated); ``eval_at_end``: evaluate at the end of the run whatever the cadence."""

    stage: str
    epochs: int
    steps: int
    losses: tuple[str, ...]
    accum: int = 1
    cadence: Cadence = field(default_factory=Cadence)
    seed: int = 0
    eval_at_end: bool = True
    progress: bool = True


class Method:
    """What one training stage supplies to :func:`run`. Defaults: no evaluation, no state, no data position."""

    def batches(self, epoch: int, done: int, position: dict[str, Any] | None) -> Iterable[Any]:
        """This rank's micro-batches of ``epoch`` from optimizer step ``done`` on (``done x accum`` consumed), at
        least ``(steps - done) x accum`` of them; ``position`` is what :meth:`position` returned when the run was
        checkpointed in this epoch (None: from the start, or unknown)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The forward of one micro-batch (run under autocast): ``(loss to back-propagate, [the plan's losses])``."""
        raise NotImplementedError

    def count(self, batch: Any) -> int:
        """Images in a micro-batch (throughput)."""
        return 0

    def position(self) -> dict[str, Any] | None:
        """The data position within the current epoch (a collective: called on every rank at a checkpoint)."""
        return None

    def evaluate(self, st: LoopState, final: bool) -> dict[str, float] | None:
        """Score the model at ``st`` (every rank calls it); the row is logged and kept in the history. ``final``: the
        end of the run (e.g. keep predictions for pictures)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The method's own resumable state (best score so far, ...), kept in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def checkpointed(self, path: Path | None) -> None:
        """Called after every checkpoint (e.g. fine-tuning copies its last weights next to it)."""


@dataclass
class LoopState:
    """Where a run is; kept in every checkpoint (``extra["loop"]``)."""

    epoch: int = 0  # the epoch in progress
    done: int = 0  # optimizer steps done in it
    step: int = 0  # optimizer steps done in all
    images: int = 0  # training images seen, all ranks
    train_seconds: float = 0.0  # training time (evaluation and checkpoints excluded)
    evaluated_at: int = -1  # the step of the last evaluation
    history: list[dict[str, float]] = field(default_factory=list)  # evaluation rows
    summary: dict[str, float] = field(default_factory=dict)  # the last log interval's metrics
    world_size: int = 1  # of the process group that wrote the state


@dataclass
class LoopResult:
    """What every loop returns: the trained (bare) model, ``metrics`` (``final_<loss>`` and the last interval's
    rates, the counters, and the last evaluation row), the evaluation ``history``, the last checkpoint written or
    resumed and its run directory, and the method's final state."""

    model: torch.nn.Module
    metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint: Path | None
    run_dir: Path | None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    method: Method
    eng: Engine
    schedule: Schedule
    plan: Plan
    ckpts: Checkpoints | None
    log_fn: LogFn
    st: LoopState
    meter: LossMeter
    bar: Any
    position: dict[str, Any] | None = None  # the data position of the checkpoint resumed in the current epoch
    lr: float = 0.0


def run(method: Method, eng: Engine, schedule: Schedule, plan: Plan, *, ckpts: Checkpoints | None = None,
        log_fn: LogFn | None = None) -> LoopResult:
    """Train ``eng`` by ``method`` as ``plan`` says, resuming the newest checkpoint of ``ckpts`` (module docstring).

    Raises:
        NonFiniteLossError: a loss became NaN/inf (the message names the step and the last good checkpoint).
        RuntimeError: the data ended before the epoch's steps.
    """
    from tqdm import tqdm

    st = LoopState(world_size=eng.dist.world_size)
    r = _Run(method, eng, schedule, plan, ckpts, log_fn or (lambda m, s: None), st,
             LossMeter(plan.stage, list(plan.losses), eng.device, ckpts), None)
    _resume(r)
    st = r.st
    r.bar = tqdm(total=plan.epochs * plan.steps, initial=st.step, desc=plan.stage, unit="step", dynamic_ncols=True,
                 disable=not (plan.progress and eng.dist.is_main))
    with preempt.handlers():  # a time-limit warning or a preemption sets a flag; acted on at a log point
        while st.epoch < plan.epochs:
            _epoch(r)
            st.epoch, st.done, r.position = st.epoch + 1, 0, None
            _unit_end(r, st.epoch, last=st.epoch == plan.epochs) if plan.cadence.unit == "epoch" else None
    if plan.eval_at_end and st.evaluated_at != st.step:  # e.g. resumed after the last checkpoint, before its eval
        _evaluate(r, final=True)
    r.bar.close()
    metrics = {**{f"final_{k}": v for k, v in st.summary.items() if k != "epoch"}, **_counters(r),
               **(st.history[-1] if st.history else {})}
    return LoopResult(eng.model, metrics, st.history, ckpts.last if ckpts else None, ckpts.dir if ckpts else None,
                      method.state_dict())


def _counters(r: _Run) -> dict[str, float]:
    st = r.st
    return {"epochs_done": st.epoch, "steps": st.step, "steps_per_epoch": r.plan.steps, "accum": r.plan.accum,
            "world_size": r.eng.dist.world_size, "train_seconds": st.train_seconds,
            "train_images_per_s": st.images / max(st.train_seconds, 1e-9)}


def _epoch(r: _Run) -> None:
    """The rest of the epoch in progress, from its optimizer step ``st.done``."""
    st, plan, accum = r.st, r.plan, r.plan.accum
    total = plan.steps * accum  # micro-batches in the epoch
    batches = iter(r.method.batches(st.epoch, st.done, r.position))
    r.eng.net.train()
    r.meter.reset()  # the interval starts here (nothing is pending: every epoch ends at a log point)
    for micro in range(st.done * accum, total):
        t = time.perf_counter()
        batch = next(batches, None)
        r.meter.waited(time.perf_counter() - t)
        if batch is None:
            raise RuntimeError(f"{plan.stage}: epoch {st.epoch}: the data ended after {micro} of {total} batches "
                               f"(shard manifest counts do not match the tars?)")
        if micro % accum == 0:  # one lr per optimizer step, at its fractional epoch
            r.lr = r.schedule(st.step, st.epoch + micro / total)
        out = r.eng.step(partial(r.method.loss, batch), it=micro, accum=accum, steps=total)
        r.meter.add(out[1], st.step, r.method.count(batch))
        if (micro + 1) % accum == 0:
            st.step, st.done = st.step + 1, st.done + 1
            r.bar.update(1)
            _step_end(r, last_of_epoch=micro + 1 == total)


def _step_end(r: _Run, last_of_epoch: bool) -> None:
    """After an optimizer step: log (and guard) at log points; a step-unit run evaluates and checkpoints when due; an
    epoch-unit run checkpoints mid-epoch when the minutes are up or the cluster asks the job to stop (checked at log
    points only: they are collectives, and the log point already syncs)."""
    st, c = r.st, r.plan.cadence
    log_point = st.step % c.log_every == 0 or last_of_epoch
    if log_point:
        _log(r)
    if c.unit == "step":
        _unit_end(r, st.step, last=st.step == r.plan.steps, log_point=log_point)
    elif log_point and not last_of_epoch:
        due, stop = _minutes_due(r), _stop_requested(r)  # both collectives: every rank calls both
        if due or stop:
            _save(r)
        if stop:
            _stop(r)


def _unit_end(r: _Run, count: int, last: bool, log_point: bool = True) -> None:
    """The end of an epoch (epoch unit) or of an optimizer step (step unit), ``count`` of them done: evaluate, then
    checkpoint, when due. The losses are read before any checkpoint (a checkpoint never holds a diverged model)."""
    c = r.plan.cadence
    if (last and r.plan.eval_at_end) or (c.eval_every and count % c.eval_every == 0):
        _evaluate(r, final=last)
    due, stop = (_minutes_due(r), _stop_requested(r)) if log_point else (False, False)  # collectives
    if last or (c.ckpt_every and count % c.ckpt_every == 0) or due or stop:
        if not log_point:
            _log(r)
        _save(r)
    if stop and not last:  # a finished run just finishes
        _stop(r)


def _log(r: _Run) -> None:
    """Read the interval's losses (one host sync; raises on a non-finite loss) and log them with the rates."""
    st = r.st
    m = r.meter.read(r.eng.dist.world_size, epoch=st.epoch)
    st.train_seconds += r.meter.interval_seconds
    st.images += r.meter.interval_images
    m.update(lr=r.lr, epoch=_epoch_at(r), peak_mem_mb=_peak_mb(r.eng.device))
    st.summary = m
    r.bar.set_postfix(loss=f"{m[r.plan.losses[0]]:.4f}", img_s=f"{m['images_per_s']:.1f}", lr=f"{r.lr:.2e}")
    if r.eng.dist.is_main:
        r.log_fn(m, st.step)


def _evaluate(r: _Run, final: bool) -> None:
    t = time.perf_counter()
    row = r.method.evaluate(r.st, final)
    r.st.evaluated_at = r.st.step
    if row:
        row = {"step": r.st.step, "epoch": _epoch_at(r), **row}
        r.st.history.append(row)
        if r.eng.dist.is_main:
            r.log_fn({k: v for k, v in row.items() if k != "step"}, r.st.step)
    r.meter.paused(time.perf_counter() - t)  # evaluation time is not training time


def _epoch_at(r: _Run) -> float | int:
    """The fractional epoch of the run's position (an int at an epoch boundary)."""
    st = r.st
    if st.done in (0, r.plan.steps):
        return st.epoch + st.done // r.plan.steps
    return st.epoch + st.done / r.plan.steps


def _save(r: _Run) -> None:
    """A checkpoint at the current optimizer step (a collective: every rank's RNG state and data position)."""
    if r.ckpts is None:
        return
    t = time.perf_counter()
    position = r.method.position() if 0 < r.st.done < r.plan.steps else None
    schedule = {"lr": r.lr, "set_at_step": max(r.st.step - 1, 0), "at_epoch": _epoch_at(r)}  # the lr of the last step
    extra = {"loop": asdict(r.st), "method": r.method.state_dict(), "position": position, "schedule": schedule}
    path = r.ckpts.save(r.eng, epoch=r.st.epoch, step=r.st.step, batches=r.st.done, extra=extra)
    r.method.checkpointed(path)
    r.meter.paused(time.perf_counter() - t)


def _resume(r: _Run) -> None:
    """Restore the newest checkpoint of the run, if any: weights, optimizer, scaler and RNG (the engine's), the loop
    state, the method's state and the data position. On another world size each rank's RNG is seeded anew from
    ``(seed, step, rank)`` (the stored states belong to the old ranks)."""
    from localmim.runtime.seed import seed_everything

    payload = r.ckpts.resume(r.eng) if r.ckpts is not None else None
    if payload is None:
        return
    extra = payload["extra"]
    r.st = LoopState(**extra["loop"])
    r.method.load_state_dict(extra.get("method") or {})
    r.position = extra.get("position")
    if r.st.world_size != r.eng.dist.world_size:
        seed_everything((r.plan.seed * 1_000_003 + r.st.step) * 1009 + r.eng.dist.rank)
        r.st.world_size = r.eng.dist.world_size


def _minutes_due(r: _Run) -> bool:
    """Whether a time-based checkpoint is due, decided by rank 0 and shared (all ranks must save together)."""
    if r.plan.cadence.ckpt_minutes <= 0 or r.ckpts is None:
        return False
    return _agree(r, time.monotonic() - r.ckpts.saved_at >= 60 * r.plan.cadence.ckpt_minutes)


def _stop_requested(r: _Run) -> bool:
    """Whether the cluster asked this job to stop (time limit, preemption): on any rank (a collective under DDP)."""
    return preempt.stop_requested(r.eng.dist)


def _stop(r: _Run) -> None:
    """After the checkpoint of a requested stop: every rank waits for rank 0's write, then the stage exits 75 (the
    cluster profile resubmits the job, which resumes from that checkpoint)."""
    st = r.st
    r.bar.close()
    where = (f"epoch {st.epoch}, step {st.done} of {r.plan.steps}" if st.done else f"the end of epoch {st.epoch - 1}")
    where += f" (optimizer step {st.step})"
    preempt.stop(r.eng.dist, where, str(r.ckpts.last) if r.ckpts is not None and r.ckpts.last else None)


def _agree(r: _Run, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a broadcast under DDP)."""
    if not r.eng.dist.distributed:
        return flag
    import torch.distributed as tdist

    t = torch.tensor(float(flag), device=r.eng.device)
    tdist.broadcast(t, src=0)
    return bool(t.item())


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

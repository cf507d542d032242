"""Stopping a training run for resubmission: at a cluster time limit or a preemption, checkpoint and exit 75.

The cluster's side (docs/reproducing.md, "Time limits and preemption"): the SLURM profile asks SLURM for
``SIGURG`` a few minutes before a training job's time limit (``--signal=URG@<cluster.rules.<rule>.stop_seconds>``),
preemption and ``scancel`` send ``SIGTERM``, and the profile's ``retries`` resubmit a job that exited non-zero;
the resubmitted job resumes from the newest checkpoint (checkpoints live outside the rule's outputs).

The loop's side, this module:

* :func:`handlers` (a context manager around the loop) installs handlers for :data:`STOP_SIGNALS` that only set a
  flag (nothing else is safe in a signal handler; the loop acts on it between steps).
* :func:`stop_requested` is called by every rank at the same point after an optimizer step. It is collective under
  DDP: one all-reduce (MAX) of a one-element tensor on the process group's device, so one rank's signal stops every
  rank at the same step. Its cost is that all-reduce plus one host sync (``.item()``): call it where the loop syncs
  anyway (the pre-training loop: its loss logging, every ``log_every`` steps), never on a step that would otherwise
  run ahead of the device.
* :class:`StopForResubmit` is raised after the checkpoint: the stage runner ends the MLflow run KILLED (tag
  ``stopped=preempted``), writes none of the stage's outputs and exits :data:`RESUBMIT_EXIT`.

Why ``SIGURG`` for the warning and not the conventional ``SIGUSR1``: SLURM's ``--signal`` (without ``B:``) signals
every process of the job's steps, and on a one-node job the step also holds the Snakemake job process, the rule's
shell and its ``tee``. ``SIGUSR1``'s default action kills them; ``SIGURG``'s default action is to ignore it, so only
the processes that handle it (the launcher, the ranks) notice. ``SIGUSR1`` is handled the same way for launches
that do not run under Snakemake (e.g. one's own ``sbatch --signal=USR1@300`` script around ``srun``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

from localmim.utils.signals import RESUBMIT_EXIT, STOP_SIGNALS, WARNING_SIGNAL

__all__ = ["RESUBMIT_EXIT", "STOP_SIGNALS", "WARNING_SIGNAL", "StopForResubmit", "handlers", "requested", "stop",
           "stop_requested"]


_state: dict[str, Any] = {"signal": None, "pid": None}


class StopForResubmit(SystemExit):
    """The run stopped on a signal after writing a checkpoint; exit :data:`RESUBMIT_EXIT` and resume on the next
    run. A ``SystemExit``: uncaught it ends the process with that status, and ``except Exception`` never hides it."""

    def __init__(self, message: str, signal_name: str = "", checkpoint: str | None = None):
        super().__init__(RESUBMIT_EXIT)
        self.message, self.signal_name, self.checkpoint = message, signal_name, checkpoint

    def __str__(self) -> str:
        return self.message


def _on_signal(signum: int, frame) -> None:  # noqa: ARG001
    """Set the flag (in the process that installed the handler). A process forked from it (a DataLoader or pool
    worker) inherits the handler: there ``SIGTERM`` does what its default does (such workers are stopped with it);
    the other stop signals are not theirs to act on and are dropped."""
    if os.getpid() != _state["pid"]:
        if signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return
    if _state["signal"] is None:
        _state["signal"] = signum


@contextlib.contextmanager
def handlers(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, ``signals`` set the stop flag instead of their previous action (restored on exit, except
    when the block ends in :class:`StopForResubmit`: the process is on its way out, and a further stop signal, e.g.
    torchrun tearing down the ranks once the first has exited, must not kill it while it ends its MLflow run). The
    flag starts cleared. Only the main thread can install handlers; elsewhere this is a no-op (nothing is caught)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.update(signal=None, pid=os.getpid())
    previous = {s: signal.signal(s, _on_signal) for s in signals}
    try:
        yield
    except StopForResubmit:
        raise
    except BaseException:
        _restore(previous)
        raise
    else:
        _restore(previous)


def _restore(previous: dict[int, Any]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def requested() -> str | None:
    """The name of the first stop signal this process received inside :func:`handlers` (None: none)."""
    s = _state["signal"]
    return signal.Signals(s).name if s is not None else None


def stop_requested(dist=None) -> bool:
    """Whether any rank received a stop signal; collective when ``dist`` (a ``DistInfo``) is distributed: every rank
    must call it at the same point (see the module docstring for its cost)."""
    flag = _state["signal"] is not None
    if dist is None or not dist.distributed:
        return flag
    import torch
    import torch.distributed as tdist

    t = torch.tensor([float(flag)], device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def stop(dist, where: str, checkpoint: str | None) -> None:
    """After the checkpoint of a requested stop: wait for every rank (rank 0 has written it when all arrive; no rank
    may exit first, or torchrun would tear the others down mid-write), then raise :class:`StopForResubmit`."""
    if dist is not None and dist.distributed:
        import torch.distributed as tdist

        tdist.barrier()
    name = requested() or "a stop signal on another rank"
    raise StopForResubmit(f"stopped by {name} at {where}; checkpoint {checkpoint or '(written by rank 0)'}; run "
                          f"again to resume (exit {RESUBMIT_EXIT})", name, checkpoint)

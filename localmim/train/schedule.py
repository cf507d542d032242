"""Learning-rate schedules: the lr as a function of the training position; loops set it with
:func:`localmim.train.engine.set_lr` (which multiplies in each param group's ``lr_scale``).

* :class:`WarmupCosine` (method §7, §8; pretrain, finetune, linprobe): timm's ``CosineLRScheduler`` with the warm-up
  as a prefix (linear from 0, then a half cosine to ``min_lr``). Equal to the method §7 formula this module wrote
  out before, up to float rounding: timm computes ``e·(lr/W)`` and ``π·t/T`` where the formula had ``lr·e/W`` and
  ``π·(t/T)``; measured at most 2.2e-13 relative, largest where the lr nears ``min_lr``
  (``tests/test_engine.py``).
* :class:`PolyWarmup` (method §9.1, segment) and :class:`DetSchedule` (method §9.2, detect) stay written out: their
  warm-ups multiply the decayed lr by a linear factor (MMCV's and Detectron2's rule), while timm's
  ``PolyLRScheduler`` / ``MultiStepLRScheduler`` / ``CosineLRScheduler`` *replace* the lr by a linear ramp up to the
  peak during warm-up. The two agree only when no decay happens inside the warm-up (a step schedule whose first
  drop comes after it); the poly and cosine schedules decay from the first iteration, so timm would change the lr
  of every warm-up iteration (and jump at its end).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """lr as a function of the fractional epoch ``e`` (method §7).

    ``lr·e/W`` for ``e < W``, then ``min_lr + (lr - min_lr)·½·(1 + cos(π(e - W)/(E - W)))``, computed by timm's
    ``CosineLRScheduler`` (``warmup_prefix=True``, ``warmup_lr_init=0``) on a one-parameter holder optimizer.

    Args:
        lr: peak learning rate (absolute, already scaled by the batch size).
        min_lr: final learning rate.
        warmup_epochs: W, may be fractional.
        epochs: E, the total length of the schedule.
    """

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: float
    _timm: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"schedule: epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"schedule: warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.lr < 0 or self.min_lr < 0:
            raise ValueError(f"schedule: lr={self.lr} and min_lr={self.min_lr} must be >= 0")
        if self.epochs > self.warmup_epochs:
            from timm.scheduler import CosineLRScheduler

            holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=self.lr)
            quiet = logging.getLogger("timm.scheduler.cosine_lr")
            level = quiet.level  # timm warns "no effect" for a cosine of length 1; stepped by fractional epochs it has
            quiet.setLevel(logging.ERROR)
            try:
                sched = CosineLRScheduler(holder, t_initial=self.epochs - self.warmup_epochs, lr_min=self.min_lr,
                                          warmup_t=self.warmup_epochs, warmup_lr_init=0.0, warmup_prefix=True,
                                          t_in_epochs=True)
            finally:
                quiet.setLevel(level)
            object.__setattr__(self, "_timm", (holder, sched))

    def __call__(self, epoch: float) -> float:
        if self._timm is None:  # warm-up covers the whole run: linear, then stay at the peak
            return self.lr * epoch / self.warmup_epochs if epoch < self.warmup_epochs else self.lr
        holder, sched = self._timm
        sched.step(epoch)
        return holder.param_groups[0]["lr"]


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


@dataclass(frozen=True)
class DetSchedule:
    """lr at iteration ``it``: ``lr · warm(it) · decay(it)``. ``warm`` rises linearly from ``warmup_factor`` to 1
    over ``warmup_iters``; ``step`` multiplies by 0.1 at each ``milestones`` fraction of ``total_iters``,
    ``cosine`` falls from ``lr`` to ``min_lr`` over the run (Detectron2's conventions)."""

    lr: float
    total_iters: int
    warmup_iters: int = 0
    kind: str = "step"
    milestones: tuple[float, ...] = ()
    min_lr: float = 0.0
    warmup_factor: float = 0.001

    def __call__(self, it: int) -> float:
        if self.kind == "step":
            lr = self.lr * 0.1 ** sum(it >= m * self.total_iters for m in self.milestones)
        else:
            t = min(it / max(self.total_iters, 1), 1.0)
            lr = self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        if it < self.warmup_iters:
            a = it / self.warmup_iters
            lr *= self.warmup_factor * (1 - a) + a
        return lr

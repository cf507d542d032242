"""Learning-rate schedules: each sets the lr of every param group of the optimizer for an optimizer step (times the
group's ``lr_scale``, layer-wise decay) and returns the unscaled lr. The training loop calls
``schedule(step, epoch)`` at the start of every accumulation cycle, with the optimizer step and the fractional epoch.

* :class:`WarmupCosine` (method §7, §8; pretrain, finetune, linprobe): timm's ``CosineLRScheduler`` driven directly on
  the training optimizer (timm applies ``lr_scale``), stepped by fractional epoch, with the warm-up as a prefix
  (linear from 0, then a half cosine to ``min_lr``). Equal to the method §7 formula up to float rounding: timm
  computes ``e·(lr/W)`` and ``π·t/T`` where the formula has ``lr·e/W`` and ``π·(t/T)``; measured at most 2.2e-13
  relative, largest where the lr nears ``min_lr`` (``tests/test_engine.py``).
* :class:`PolyWarmup` (method §9.1, segment) and :class:`DetSchedule` (method §9.2, detect) stay written out, applied
  by :class:`StepSchedule`: their warm-ups multiply the decayed lr by a linear factor (MMCV's and Detectron2's rule),
  while timm's ``PolyLRScheduler`` / ``MultiStepLRScheduler`` / ``CosineLRScheduler`` *replace* the lr by a linear
  ramp up to the peak during warm-up. The two agree only when no decay happens inside the warm-up (a step schedule
  whose first drop comes after it); the poly and cosine schedules decay from the first iteration, so timm would
  change the lr of every warm-up iteration (and jump at its end).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from localmim.train.engine import set_lr


def check_cosine(lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> None:
    """Raises ValueError for a schedule that cannot run (no epochs, warm-up outside the run, negative lr)."""
    if epochs <= 0:
        raise ValueError(f"schedule: epochs must be > 0, got {epochs}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"schedule: warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    if lr < 0 or min_lr < 0:
        raise ValueError(f"schedule: lr={lr} and min_lr={min_lr} must be >= 0")


class WarmupCosine:
    """lr at the fractional epoch ``e`` (method §7): ``lr·e/W`` for ``e < W``, then
    ``min_lr + (lr - min_lr)·½·(1 + cos(π(e - W)/(E - W)))``, set on ``optimizer`` by timm's ``CosineLRScheduler``
    (``warmup_prefix=True``, ``warmup_lr_init=0``, ``t_in_epochs=True``).

    Args:
        optimizer: the training optimizer; every group's base lr becomes ``lr`` (timm multiplies in ``lr_scale``).
        lr: peak learning rate (absolute, already scaled by the batch size).
        min_lr: final learning rate.
        warmup_epochs: W, may be fractional.
        epochs: E, the total length of the schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_epochs: float,
                 epochs: float):
        from timm.scheduler import CosineLRScheduler

        check_cosine(lr, min_lr, warmup_epochs, epochs)
        self.lr, self.min_lr, self.warmup_epochs, self.epochs = lr, min_lr, warmup_epochs, epochs
        for group in optimizer.param_groups:  # timm's base value of every group (before its lr_scale)
            group["lr"] = group["initial_lr"] = lr
        quiet = logging.getLogger("timm.scheduler.cosine_lr")
        level = quiet.level  # timm warns "no effect" for a cosine of length 1; stepped by fractional epochs it has
        quiet.setLevel(logging.ERROR)
        try:
            # a warm-up over the whole run never reaches the cosine (any positive length: it is not evaluated)
            self.timm = CosineLRScheduler(optimizer, t_initial=(epochs - warmup_epochs) or 1.0, lr_min=min_lr,
                                          warmup_t=warmup_epochs, warmup_lr_init=0.0, warmup_prefix=True,
                                          t_in_epochs=True)
        finally:
            quiet.setLevel(level)

    def __call__(self, step: int, epoch: float) -> float:
        self.timm.step(epoch)
        group = self.timm.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)


class StepSchedule:
    """A schedule written as ``fn(step) -> lr`` (:class:`PolyWarmup`, :class:`DetSchedule`) applied to ``optimizer``
    with :func:`~localmim.train.engine.set_lr`."""

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float]):
        self.optimizer, self.fn = optimizer, fn

    def __call__(self, step: int, epoch: float) -> float:
        return set_lr(self.optimizer, self.fn(step))


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

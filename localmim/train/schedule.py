"""Per-iteration learning-rate schedule of method §7: linear warm-up, then half-cycle cosine to ``min_lr``."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """lr as a function of the fractional epoch ``e`` (method §7).

    ``lr·e/W`` for ``e < W``, then ``min_lr + (lr - min_lr)·½·(1 + cos(π(e - W)/(E - W)))``.
    Parameter groups may carry an ``lr_scale`` (layer-wise decay in fine-tuning); :meth:`apply` multiplies it in.

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

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"schedule: epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"schedule: warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.lr < 0 or self.min_lr < 0:
            raise ValueError(f"schedule: lr={self.lr} and min_lr={self.min_lr} must be >= 0")

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs
        span = self.epochs - self.warmup_epochs
        if span <= 0:  # warm-up covers the whole run: stay at the peak
            return self.lr
        t = min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer, epoch: float) -> float:
        """Set every group's lr to ``lr(epoch) · group['lr_scale']`` (default scale 1); returns ``lr(epoch)``."""
        lr = self(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def cycle_length(it: int, accum: int, steps: int) -> int:
    """Micro-batches in the accumulation cycle holding batch ``it`` of an epoch of ``steps``: ``accum``, except
    for a shorter last cycle. The loss is divided by it, so every optimizer step sees the mean micro-batch gradient
    (``accum_iter=k, batch b`` steps like ``accum_iter=1, batch k*b``, also at the end of an epoch)."""
    start = it - it % accum
    return min(accum, steps - start)

"""Seeding: one call seeds every RNG a training process draws from.

A loop seeds ``seed`` before building its model (the same initial weights on every rank; DDP broadcasts rank 0's
anyway) and ``seed + rank`` where its method draws per-rank randomness (masking noise, drop path, augmentation).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU), NumPy's global RNG (timm Mixup) and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

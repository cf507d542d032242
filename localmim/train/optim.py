"""AdamW with the weight-decay grouping of method §2.8 / §3.9, built on timm's param-group helper.

No weight decay on parameters with ≤ 1 dimension and on biases (timm's rule), nor on the names a model lists
in ``no_weight_decay()`` (timm convention: the Swin models list ``token`` / ``position_bias`` names there; the
ViT pre-training model lists nothing, so its cls and mask tokens *do* get decay, as in method §2.8). Frozen
parameters (fixed sin-cos position embeddings) are skipped.
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: ``{"params", "weight_decay": 0}`` and ``{"params", "weight_decay": weight_decay}``."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))


def create_adamw(
    params_or_model, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), device=None
) -> torch.optim.AdamW:
    """AdamW over ``weight_decay_groups(model)`` (or ready-made groups); fused kernel on CUDA.

    Raises:
        ValueError: negative lr / weight decay or betas outside [0, 1).
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"AdamW: lr={lr} and weight_decay={weight_decay} must be >= 0")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"AdamW: betas must be in [0, 1), got {tuple(betas)}")
    if isinstance(params_or_model, torch.nn.Module):
        groups = weight_decay_groups(params_or_model, weight_decay)
    else:
        groups = list(params_or_model)
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)

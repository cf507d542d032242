"""Image normalisation and per-patch-normalised pixel targets (method §5, §7)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PIX_NORM_EPS = 1e-6


def check_images(images: Tensor) -> None:
    """Raise ValueError unless ``images`` is a uint8 or floating ``[B, 3, H, W]`` tensor with H, W >= 2."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, H, W], got {images.ndim} dims with shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 colour channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or floating (normalised), got dtype {images.dtype}")
    if images.shape[2] < 2 or images.shape[3] < 2:
        raise ValueError(f"images must be at least 2x2 for reflect padding, got {images.shape[2]}x{images.shape[3]}")


def check_divides(size: int, h: int, w: int, what: str) -> None:
    """Raise ValueError unless ``size`` is a positive int dividing both ``h`` and ``w``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{what} must be a positive int, got {size!r}")
    if h % size or w % size:
        raise ValueError(f"{what} {size} must divide the image size {h}x{w} (H % {what} = {h % size}, "
                         f"W % {what} = {w % size})")


def channel_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as float32 ``[3, 1, 1]`` tensors on ``device`` (read-only: cached per device).

    Building them from Python lists on a GPU is a blocking host-to-device copy, i.e. a sync; the cache makes that
    happen once per device instead of on every training step."""
    return _channel_stats(torch.device(device))


@functools.cache
def _channel_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1).to(device)
    return mean, std


@torch.no_grad()
def normalize(images_uint8: Tensor) -> Tensor:
    """Model input from 8-bit images: ``(x / 255 - mean) / std`` per channel (method §7).

    Args:
        images_uint8: uint8 tensor ``[..., 3, H, W]`` with values 0..255.

    Returns:
        float32 tensor of the same shape, on the same device.
    """
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got dtype {images_uint8.dtype}")
    if images_uint8.ndim < 3 or images_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W], got shape {tuple(images_uint8.shape)}")
    mean, std = channel_stats(images_uint8.device)
    return (images_uint8.float() / 255.0 - mean) / std


@torch.no_grad()
def pixel_targets(images: Tensor, patch: int, norm_pix: bool = True) -> Tensor:
    """Per-patch pixel targets (method §3.6, §5).

    Args:
        images: uint8 ``[B, 3, H, W]`` (normalised with ImageNet mean/std first) or floating, already normalised.
        patch: patch side P; must divide H and W.
        norm_pix: normalise each patch vector by its mean and unbiased variance, ``(x - mu) / sqrt(var + 1e-6)``.

    Returns:
        float32 ``[B, (H/P)*(W/P), 3*P*P]``: patches in raster order, each flattened (row, col, channel) with the
        channel fastest.
    """
    check_images(images)
    b, _, h, w = images.shape
    check_divides(patch, h, w, "patch")
    x = normalize(images) if images.dtype == torch.uint8 else images.float()  # [B, 3, H, W]
    gh, gw = h // patch, w // patch
    x = x.reshape(b, 3, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, P, P, 3]
    x = x.reshape(b, gh * gw, patch * patch * 3)  # [B, L, 3*P*P]
    if norm_pix:
        mean = x.mean(dim=-1, keepdim=True)  # [B, L, 1]
        var = x.var(dim=-1, unbiased=True, keepdim=True)  # [B, L, 1], unbiased as in the reference
        x = (x - mean) / (var + PIX_NORM_EPS).sqrt()
    return x

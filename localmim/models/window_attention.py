"""ViTDet's windowed attention for a timm ViT used as a detection backbone (method §9.2, method §17 row 27).

ViTDet (Li et al., 2022) keeps a few blocks global and restricts the others to non-overlapping ``w x w`` windows of
the patch grid. :class:`WindowedBlock` does that with the timm block's own modules, only the attention input
changed (as ``swin_encoder.py`` does for Swin): the grid tokens are normalised, then timm's ``window_partition``
(from its SAM/ViTDet encoder) zero-pads them to a multiple of ``w`` (ViTDet pads after ``norm1``, so padded keys
are the projections of 0) and cuts them into windows; after attention ``window_unpartition`` puts them back. The
MLP half is per token and unchanged. Prefix tokens (cls) attend to themselves only. ViTDet's relative position
biases are not added (row 27): the pretrained weights have none.

The block keeps the wrapped block's parameter names (``blocks.i.norm1.weight``, ...), so layer-wise decay ids,
no-weight-decay rules and checkpoints see the same model with or without windows.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer_sam import window_partition, window_unpartition
from torch import Tensor, nn


class WindowedBlock(nn.Module):
    """A timm ViT ``Block`` whose attention runs within ``window x window`` windows of the ``grid`` (set per input
    by :func:`set_grid`). Same submodules, same parameter names as the block it wraps. Under gradient checkpointing
    the backward pass reruns ``forward`` with the ``grid`` of that moment: set no other grid between a forward and
    its backward (the training step does not)."""

    def __init__(self, block: nn.Module, window: int, num_prefix_tokens: int):
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.window, self.num_prefix = window, num_prefix_tokens
        self.grid: tuple[int, int] | None = None

    def _attend(self, x: Tensor) -> Tensor:
        """``norm1`` + windowed attention of ``x [B, P + H*W, C]`` (P prefix tokens)."""
        (h, w), p = self.grid, self.num_prefix
        y = self.norm1(x)
        prefix, grid = y[:, :p], y[:, p:]  # [B, P, C], [B, H*W, C]
        windows, padded = window_partition(grid.reshape(grid.shape[0], h, w, -1), self.window)  # [B*nW, w, w, C]
        attended = self.attn(windows.flatten(1, 2)).view_as(windows)  # attention within each window
        grid = window_unpartition(attended, self.window, (h, w), padded).flatten(1, 2)  # [B, H*W, C]
        return grid if not p else torch.cat([self.attn(prefix), grid], dim=1)

    def forward(self, x: Tensor, **_: object) -> Tensor:
        if self.grid is None:
            raise RuntimeError("WindowedBlock: the patch grid is not set (call set_grid before the forward)")
        x = x + self.drop_path1(self.ls1(self._attend(x)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def vitdet_global_blocks(depth: int) -> list[int]:
    """ViTDet's global blocks (0-based): the last block of each quarter, e.g. 2, 5, 8, 11 for depth 12."""
    step = max(depth // 4, 1)
    return sorted({min(i * step - 1, depth - 1) for i in range(1, 5)})


def window_blocks(encoder: nn.Module, window: int, global_blocks: list[int] | None = None) -> list[int]:
    """Replace every block of the timm ViT ``encoder`` not in ``global_blocks`` (default: ViTDet's, see
    :func:`vitdet_global_blocks`) by a :class:`WindowedBlock`; returns the windowed indices."""
    depth = len(encoder.blocks)
    keep = set(vitdet_global_blocks(depth) if global_blocks is None else global_blocks)
    if bad := sorted(i for i in keep if not 0 <= i < depth):
        raise ValueError(f"global_blocks {bad} outside the encoder's 0..{depth - 1}")
    windowed = [i for i in range(depth) if i not in keep]
    for i in windowed:
        encoder.blocks[i] = WindowedBlock(encoder.blocks[i], window, int(getattr(encoder, "num_prefix_tokens", 1)))
    return windowed


def set_grid(encoder: nn.Module, grid: tuple[int, int]) -> None:
    """Tell the windowed blocks the patch grid ``(H/p, W/p)`` of the coming input."""
    for blk in encoder.blocks:
        if isinstance(blk, WindowedBlock):
            blk.grid = grid


__all__ = ["WindowedBlock", "set_grid", "vitdet_global_blocks", "window_blocks"]

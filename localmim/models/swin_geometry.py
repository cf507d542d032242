"""Index bookkeeping for the visible-only Swin encoder (method §3.2-3.3, §14.2).

All functions here run on the host (CPU) on tiny integer tensors: the block-wise mask is shared by the whole
batch, so token coordinates, window membership and relative-position indices do not depend on the images.
Computing them on the host and copying the results to the device avoids any device->host synchronisation.

Token order ("block order"): visible mask cells in increasing raster id on the G x G final grid; inside each
cell its ``b x b`` stage tokens in raster order, with ``b = 2**(3 - stage)`` (8, 4, 2, 1). Merging 2x2 groups
inside a cell keeps this order, so every stage uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def draw_cell_mask(
    num_cells: int, mask_ratio: float, reference_count: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one block-wise mask over the final-grid cells, shared by the batch (method §3.2, §14.2).

    Args:
        num_cells: Number of final-grid cells ``N_m = G**2``.
        mask_ratio: Mask ratio ``r`` in [0, 1).
        reference_count: If True mask ``floor(r*N_m) + 1`` cells (reference rule), else
            ``N_m - max(1, floor(N_m*(1-r)))`` cells.
        generator: Optional CPU generator for the permutation.

    Returns:
        Bool tensor ``[N_m]`` on the CPU, True = masked.

    Raises:
        ValueError: If the ratio is outside [0, 1) or no cell would stay visible.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if reference_count:
        num_masked = int(mask_ratio * num_cells) + 1
    else:
        num_masked = num_cells - max(1, int(num_cells * (1.0 - mask_ratio)))
    if num_masked >= num_cells:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks {num_masked} of {num_cells} cells (reference rule={reference_count}); "
            "at least one cell must stay visible"
        )
    rank = torch.randperm(num_cells, generator=generator)
    return rank < num_masked  # [N_m], rank 0..num_masked-1 are masked


def token_coords(visible_cells: torch.Tensor, grid: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row / column of every visible token of one stage, in block order.

    Args:
        visible_cells: Increasing raster ids of the visible cells on the ``grid x grid`` final grid, ``[n]``.
        grid: Final-grid side G.
        side: Tokens per cell side at this stage, ``2**(3 - stage)``.

    Returns:
        ``(y, x)``, each ``[n * side**2]`` long, coordinates on the ``G*side`` stage grid.
    """
    cy, cx = visible_cells // grid, visible_cells % grid  # [n]
    ty, tx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # [side, side]
    y = (cy[:, None] * side + ty.reshape(1, -1)).reshape(-1)  # [n*side^2]
    x = (cx[:, None] * side + tx.reshape(1, -1)).reshape(-1)
    return y, x


def window_ids(y: torch.Tensor, x: torch.Tensor, res: int, window: int, shift: int) -> torch.Tensor:
    """Id of the (possibly shifted) Swin window holding each token, from its true grid coordinates.

    Window boundaries lie at ``shift + k*window``; partial border windows are their own windows. This is the
    partition that cyclic shift + region mask realises in standard Swin.
    """
    offset = (window - shift) % window
    per_row = (res + offset + window - 1) // window
    return ((y + offset) // window) * per_row + (x + offset) // window


def relative_index(yq: torch.Tensor, xq: torch.Tensor, yk: torch.Tensor, xk: torch.Tensor, window: int):
    """Index into a ``(2w-1)**2`` relative-position-bias table for every (query, key) pair.

    Same convention as Swin: ``(dy + w - 1) * (2w - 1) + (dx + w - 1)`` with ``d = query - key``. Pairs farther
    apart than a window (only ever masked out) are clamped into the table.
    """
    dy = (yq[..., :, None] - yk[..., None, :] + window - 1).clamp(0, 2 * window - 2)  # [..., Lq, Lk]
    dx = (xq[..., :, None] - xk[..., None, :] + window - 1).clamp(0, 2 * window - 2)
    return dy * (2 * window - 1) + dx


@dataclass
class AttentionPlan:
    """How one block's visible tokens are grouped for batched masked attention.

    Attributes:
        rel_index: ``[nG, Lm, Lm]`` long, bias-table index per (query, key) pair within each group.
        mask: ``[nG, 1, Lm, Lm]`` float, 0 where the key may be attended, -inf otherwise.
        gather: ``[nG*Lm]`` token index feeding each packed slot (padding slots repeat token 0), or None when
            the single group is the whole token sequence.
        scatter: ``[L]`` packed slot of each token, or None (identity).
    """

    rel_index: torch.Tensor
    mask: torch.Tensor
    gather: torch.Tensor | None
    scatter: torch.Tensor | None

    def to(self, device: torch.device) -> AttentionPlan:
        move = lambda t: None if t is None else to_device(t, device)
        return AttentionPlan(move(self.rel_index), move(self.mask), move(self.gather), move(self.scatter))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host index tensor -> ``device`` without blocking the host: pinned + non_blocking on CUDA, no-op on CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def dense_plan(y: torch.Tensor, x: torch.Tensor, res: int, window: int, shift: int) -> AttentionPlan:
    """One group with all L visible tokens; pairs in different windows are masked (cost O(L^2))."""
    wid = window_ids(y, x, res, window, shift)  # [L]
    same = wid[:, None] == wid[None, :]  # [L, L]
    mask = torch.zeros(same.shape).masked_fill(~same, float("-inf"))[None, None]  # [1, 1, L, L]
    return AttentionPlan(relative_index(y, x, y, x, window)[None], mask, None, None)


def packed_plan(y: torch.Tensor, x: torch.Tensor, res: int, window: int, shift: int) -> AttentionPlan:
    """One group per non-empty window, padded to the largest visible count Lm (cost O(nG * Lm^2))."""
    wid = window_ids(y, x, res, window, shift)  # [L]
    order = torch.argsort(wid, stable=True)  # tokens grouped by window
    _, counts = torch.unique_consecutive(wid[order], return_counts=True)  # [nG]
    num_groups, max_len = counts.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(num_groups), counts)  # [L], sorted order
    slot = group * max_len + torch.arange(order.numel()) - starts[group]  # packed slot, sorted order
    gather = torch.zeros(num_groups * max_len, dtype=torch.long).index_copy_(0, slot, order)
    valid = torch.zeros(num_groups * max_len, dtype=torch.bool).index_fill_(0, slot, True)
    scatter = torch.empty_like(order).index_copy_(0, order, slot)  # [L]
    yk, xk = y[gather].view(num_groups, max_len), x[gather].view(num_groups, max_len)
    mask = torch.zeros(num_groups, 1, 1, max_len).masked_fill(~valid.view(num_groups, 1, 1, max_len), float("-inf"))
    mask = mask.expand(-1, -1, max_len, -1)  # [nG, 1, Lm, Lm]
    return AttentionPlan(relative_index(yk, xk, yk, xk, window), mask, gather, scatter)


def block_to_raster(visible_cells: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """Raster position (on the ``G*side`` grid) of every visible token in block order, ``[n*side**2]``."""
    y, x = token_coords(visible_cells, grid, side)
    return y * (grid * side) + x

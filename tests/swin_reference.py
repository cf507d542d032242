"""The token order of the Swin visible-only encoder written from its definition (method §3.3)."""

from __future__ import annotations


def block_order(visible: list[int], grid: int, side: int) -> list[tuple[int, int]]:
    """(row, col) of each token in the spec's block order: visible cells ascending, tokens raster inside a cell."""
    out = []
    for c in visible:
        cy, cx = divmod(c, grid)
        out += [(cy * side + ty, cx * side + tx) for ty in range(side) for tx in range(side)]
    return out

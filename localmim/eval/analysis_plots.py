"""Figures of ``localmim analyze``: curves per block and tap reconstructions (matplotlib, Agg), as PNG bytes (the
stage writes them)."""

from __future__ import annotations

import math

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def plot_layers(per_layer: dict[str, list[float]], taps: list[int], title: str) -> bytes:
    """Probe / kNN top-1, attention NMI and distance against the block index; tapped blocks marked."""
    plt = _plt()
    panels = [("top-1 (%)", [("probe_top1", "linear probe"), ("knn_top1", "kNN")])]
    if per_layer.get("attn_nmi"):
        panels += [("attention NMI", [("attn_nmi", "NMI")]), ("attention distance (px)", [("attn_distance_px",
                                                                                           "mean distance")])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    x = np.arange(1, len(per_layer["probe_top1"]) + 1)
    for ax, (label, series) in zip(axes[0], panels, strict=True):
        for key, name in series:
            ax.plot(x, per_layer[key], "o-", ms=3, label=name)
        for k, t in enumerate(taps):
            ax.axvline(t + 1, color="gray", lw=0.8, ls=":", label="LocalMIM taps" if k == 0 else None)
        ax.set_xlabel("block")
        ax.set_xticks(x if len(x) <= 12 else x[::2])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _unpatchify(tokens: torch.Tensor, grid: tuple[int, int], cell: int) -> np.ndarray:
    """Pixel-target tokens ``[M, c*c*3]`` (row, col, channel; channel fastest) -> image ``[h*c, w*c, 3]``."""
    gh, gw = grid
    x = tokens.reshape(gh, gw, cell, cell, 3).permute(0, 2, 1, 3, 4).reshape(gh * cell, gw * cell, 3)
    return x.numpy()


def _pixel_panel(ax, tokens, mask, grid, cell) -> None:
    img = np.clip((_unpatchify(tokens, grid, cell) + 2.5) / 5.0, 0, 1)  # normalised values, +-2.5 sd shown
    m = mask.reshape(grid).numpy().repeat(cell, 0).repeat(cell, 1)  # [H, W] masked cells
    img[~m] = 0.5
    ax.imshow(img)


def _hog_panel(ax, tokens, mask, grid, cell, nbins, scale: float) -> None:
    """Orientation glyphs: one segment per bin along the edge direction, length ~ histogram value (RGB summed)."""
    from matplotlib.collections import LineCollection

    gh, gw = grid
    hist = tokens.reshape(gh * gw, 3, nbins).sum(1).clamp_min(0).numpy() / max(scale, 1e-12)  # [M, nb]
    phi = (np.arange(nbins) + 0.5) * math.pi / nbins  # bin centres; edge direction (cos, -sin) in y-down pixels
    segs = []
    for i in np.flatnonzero(mask.numpy()):
        cy, cx = (i // gw + 0.5) * cell, (i % gw + 0.5) * cell
        for b in range(nbins):
            r = 0.5 * cell * min(hist[i, b], 1.0)
            dx, dy = r * math.cos(phi[b]), -r * math.sin(phi[b])
            segs.append([(cx - dx, cy - dy), (cx + dx, cy + dy)])
    h, w = gh * cell, gw * cell
    ax.imshow(np.zeros((h, w)), cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))
    ax.add_collection(LineCollection(segs, colors="white", linewidths=0.8))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)


def plot_reconstructions(images: torch.Tensor, mask: torch.Tensor, taps, patch: int, target: str,
                         nbins: int) -> bytes:
    """One row per image: the input with masked patches greyed, then target | prediction of every tap on its
    masked cells (pixels: per-patch-normalised values; HOG: orientation glyphs, one scale per tap and image)."""
    plt = _plt()
    b = images.shape[0]
    cols = 1 + 2 * len(taps)
    fig, axes = plt.subplots(b, cols, figsize=(1.7 * cols, 1.8 * b), squeeze=False)
    side = images.shape[-1] // patch
    for r in range(b):
        img = images[r].permute(1, 2, 0).numpy().astype(np.float64) / 255.0
        m = mask[r].reshape(side, -1).bool().numpy().repeat(patch, 0).repeat(patch, 1)
        img[m] = img[m] * 0.25 + 0.375
        axes[r][0].imshow(img)
        for k, t in enumerate(taps):
            ta, pa = axes[r][1 + 2 * k], axes[r][2 + 2 * k]
            if target == "hog":
                scale = float(t.target[r].reshape(-1, 3, nbins).sum(1).max())
                _hog_panel(ta, t.target[r].cpu(), t.mask[r].cpu(), t.grid, t.cell, nbins, scale)
                _hog_panel(pa, t.pred[r].cpu(), t.mask[r].cpu(), t.grid, t.cell, nbins, scale)
            else:
                _pixel_panel(ta, t.target[r].cpu(), t.mask[r].cpu(), t.grid, t.cell)
                _pixel_panel(pa, t.pred[r].cpu(), t.mask[r].cpu(), t.grid, t.cell)
            if r == 0:
                ta.set_title(f"{t.name} target\n(cell {t.cell}px)", fontsize=7)
                pa.set_title(f"{t.name} prediction", fontsize=7)
    axes[0][0].set_title("input (masked grey)", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _png(fig)

"""NumPy references of the ViT building blocks (method §2): 2-D sin-cos position embedding, mask resizing between
cell grids, the mask-weighted MSE; written from the definitions in float64."""

from __future__ import annotations

import numpy as np


def np_sincos(h: int, w: int, dim: int) -> np.ndarray:
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    out = np.zeros((h * w, dim))
    for i in range(h):
        for j in range(w):
            t = i * w + j
            out[t, :quarter], out[t, quarter : 2 * quarter] = np.sin(j * omega), np.cos(j * omega)
            out[t, 2 * quarter : 3 * quarter], out[t, 3 * quarter :] = np.sin(i * omega), np.cos(i * omega)
    return out


def np_resize_mask(m: np.ndarray, scale: float) -> np.ndarray:
    b, h, w = m.shape
    if scale >= 1:
        s = int(scale)
        up = np.stack([np.kron(m[i], np.ones((s, s))) for i in range(b)])
        return up.reshape(b, -1)
    k = int(round(1 / scale))
    return m.reshape(b, h // k, k, w // k, k).mean(axis=(2, 4)).reshape(b, -1)


def np_masked_mse(pred: np.ndarray, target: np.ndarray, w: np.ndarray) -> float:
    num = 0.0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            num += w[b, i] * np.mean((pred[b, i] - target[b, i]) ** 2)
    return num / w.sum()

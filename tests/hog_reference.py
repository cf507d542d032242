"""Independent float64 NumPy reference for the HOG and pixel targets, written from method §4 and §5 (no torch).

The Sobel responses are the plain 3x3 cross-correlation of the reflect-padded channel (not the separable form
used by the code under test). For integer or dyadic-rational pixel values every product and partial sum is exact in
float64, so the responses are exact. The orientation bin ``floor(phi * nb / pi) mod nb`` is evaluated in float64 and
snapped to an integer when it lies within 1e-9 of one: for exact responses such a value can only be an exact tie
(an edge with rational tangent), where exact arithmetic gives that integer; genuine non-tie angles of the test
inputs lie much farther than 1e-9 from an edge.
"""

from __future__ import annotations

import numpy as np

K0 = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
K1 = K0.T.copy()
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
SNAP = 1e-9


def sobel_reference(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Responses ``(c0, c1)`` of one ``[H, W]`` channel: reflect pad by 1, 3x3 cross-correlation with K0 and K1."""
    x = np.asarray(channel, dtype=np.float64)
    h, w = x.shape
    padded = np.pad(x, 1, mode="reflect")
    c0 = np.zeros((h, w))
    c1 = np.zeros((h, w))
    for dr in range(3):
        for dc in range(3):
            window = padded[dr:dr + h, dc:dc + w]
            c0 += K0[dr, dc] * window
            c1 += K1[dr, dc] * window
    return c0, c1


def bins_reference(c0: np.ndarray, c1: np.ndarray, nbins: int) -> np.ndarray:
    """``floor(atan2(c0, c1) * nb / pi) mod nb`` with exact ties snapped (see module docstring)."""
    t = np.arctan2(c0, c1) * nbins / np.pi
    nearest = np.round(t)
    t = np.where(np.abs(t - nearest) < SNAP, nearest, t)
    return np.mod(np.floor(t).astype(np.int64), nbins)


def pixel_histogram_reference(channel: np.ndarray, nbins: int, bias=(0.0, 0.0)) -> np.ndarray:
    """Per-pixel one-bin histogram ``[nb, H, W]`` of one channel (method §4 steps 1-5)."""
    c0, c1 = sobel_reference(channel)
    c0 = c0 + float(bias[0])
    c1 = c1 + float(bias[1])
    mag = np.sqrt(c0 ** 2 + c1 ** 2)
    bins = bins_reference(c0, c1, nbins)
    hist = np.zeros((nbins,) + c0.shape)
    for b in range(nbins):
        hist[b] = np.where(bins == b, mag, 0.0)
    return hist


def hog_reference(image: np.ndarray, nbins: int, cell: int, bias=(0.0, 0.0)) -> np.ndarray:
    """HOG of one ``[3, H, W]`` image: ``[3*nb, H/cell, W/cell]``, features ``[R bins, G bins, B bins]``."""
    _, h, w = image.shape
    assert h % cell == 0 and w % cell == 0
    feats = []
    for ch in range(3):
        hist = pixel_histogram_reference(image[ch], nbins, bias)
        pooled = hist.reshape(nbins, h // cell, cell, w // cell, cell).mean(axis=(2, 4))  # [nb, h, w]
        norm = np.sqrt((pooled ** 2).sum(axis=0, keepdims=True))
        feats.append(pooled / np.maximum(norm, 1e-12))
    return np.concatenate(feats, axis=0)


def hog_reference_batch(images: np.ndarray, nbins: int, cell: int, bias=(0.0, 0.0)) -> np.ndarray:
    """``hog_reference`` over a ``[B, 3, H, W]`` batch."""
    return np.stack([hog_reference(img, nbins, cell, bias) for img in images])


def normalize_reference(images_uint8: np.ndarray) -> np.ndarray:
    """``(x / 255 - mean) / std`` per channel in float64, ``[B, 3, H, W]``."""
    x = np.asarray(images_uint8, dtype=np.float64) / 255.0
    return (x - MEAN[None, :, None, None]) / STD[None, :, None, None]


def pixel_targets_reference(images: np.ndarray, patch: int, norm_pix: bool = True) -> np.ndarray:
    """Per-patch pixel targets of a normalised ``[B, 3, H, W]`` batch (method §5): ``[B, L, 3*P*P]``."""
    b, c, h, w = images.shape
    out = np.zeros((b, (h // patch) * (w // patch), c * patch * patch))
    for n in range(b):
        idx = 0
        for i in range(h // patch):
            for j in range(w // patch):
                block = images[n, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]  # [3, P, P]
                vec = np.asarray(block, dtype=np.float64).transpose(1, 2, 0).reshape(-1)  # (row, col, channel)
                if norm_pix:
                    mu = vec.sum() / vec.size
                    var = ((vec - mu) ** 2).sum() / (vec.size - 1)
                    vec = (vec - mu) / np.sqrt(var + 1e-6)
                out[n, idx] = vec
                idx += 1
    return out

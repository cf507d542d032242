"""Pixels of the embedded datasets: backgrounds, fill textures, colours, and :func:`render` of shape objects.

Every random choice is drawn from the ``numpy`` generator passed in, in a fixed order, so one generator state gives
one image, byte for byte after the deterministic PIL encoders.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from localmim.synth.shapes import polygon_mask, shape_outline


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """[H, W, 3] float64 background: solid, linear gradient or smooth noise."""
    kind = rng.integers(3)
    c0, c1 = _colour(rng), _colour(rng)
    if kind == 0:
        return np.broadcast_to(c0, (height, width, 3)).copy()
    if kind == 1:
        t = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        u = xx * math.cos(t) + yy * math.sin(t)
        u = (u - u.min()) / max(np.ptp(u), 1e-9)
        return c0 + (c1 - c0) * u[..., None]
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR), dtype=np.float64)
    return smooth + rng.normal(0, 6, (height, width, 3))


def _texture(rng: np.random.Generator, colour: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W, 3] float64 fill: solid, stripes, checker or noise around ``colour``."""
    kind = rng.integers(4)
    other = np.clip(colour + rng.choice([-1, 1]) * rng.uniform(50, 90), 0, 255)
    if kind == 0:
        return np.broadcast_to(colour, (height, width, 3)).copy()
    if kind == 3:
        return colour + rng.normal(0, 18, (height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    period = rng.uniform(4, 10)
    if kind == 1:
        t = rng.uniform(0, np.pi)
        on = ((xx * math.cos(t) + yy * math.sin(t)) // (period / 2)) % 2 == 0
    else:
        on = ((xx // (period / 2)) + (yy // (period / 2))) % 2 == 0
    return np.where(on[..., None], colour, other)


def _contrasting(rng: np.random.Generator, bg: np.ndarray, min_dist: float = 110.0) -> np.ndarray:
    mean = bg.reshape(-1, 3).mean(0)
    for _ in range(64):
        c = _colour(rng)
        if np.linalg.norm(c - mean) >= min_dist:
            return c
    return 255.0 - mean  # always far enough from the mean


def _class_colour(rng: np.random.Generator, label: int, num_kinds: int) -> np.ndarray:
    """A saturated colour around the class's typical hue (``label / num_kinds`` of the colour wheel).

    Like the colour priors of natural classes (most hearts are red), this makes the class partly visible in
    coarse colour statistics, so a tiny model learns something from a few hundred images; the shape still
    decides the class for the images drawn without the prior.
    """
    import colorsys

    hue = (label / num_kinds + rng.normal(0, 0.02)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    return np.asarray(rgb) * 255.0


def image_size(rng: np.random.Generator, min_side: int, max_side: int, max_aspect: float = 2.0) -> tuple[int, int]:
    """Random ``(width, height)``: long side in ``[min_side, max_side]``, aspect up to ``max_aspect``, either way up."""
    long = int(rng.integers(min_side, max_side + 1))
    short = max(min_side, int(round(long / rng.uniform(1.0, max_aspect))))
    return (long, short) if rng.random() < 0.5 else (short, long)


@dataclass
class DrawnObject:
    """One drawn shape: class position (0-based into the kind list), outline and the pixels it covers."""

    label: int
    outline: np.ndarray  # [N, 2]
    mask: np.ndarray  # [H, W] bool, as painted (after later objects were painted over it, for ADE)


def _pose(rng: np.random.Generator, width: int, height: int, rel: tuple[float, float]) -> tuple[float, ...]:
    r = rng.uniform(*rel) * min(width, height)
    cx = rng.uniform(r + 1, width - r - 1)
    cy = rng.uniform(r + 1, height - r - 1)
    return cx, cy, r


def render(
    rng: np.random.Generator,
    kinds: list[str],
    labels: list[int],
    width: int,
    height: int,
    rel_radius: tuple[float, float],
    avoid_overlap: bool,
    colour_prior: float = 0.0,
) -> tuple[np.ndarray, list[DrawnObject]]:
    """Draw one shape per entry of ``labels`` (indices into ``kinds``) on a random background.

    Shapes stay inside the image. With ``avoid_overlap`` their bounding circles are disjoint (objects that do
    not fit after 50 tries are dropped), so every outline equals the visible pixels (needed for COCO polygons).
    With probability ``colour_prior`` a shape is filled around its class's typical hue (see ``_class_colour``)
    instead of a random colour that contrasts with the background.

    Returns:
        uint8 [H, W, 3] image and the drawn objects.
    """
    img = _background(rng, width, height)  # [H, W, 3]
    placed: list[tuple[float, float, float]] = []
    objects: list[DrawnObject] = []
    for label in labels:
        for _ in range(50):
            cx, cy, r = _pose(rng, width, height, rel_radius)
            if not avoid_overlap or all(math.hypot(cx - x, cy - y) > r + q + 1 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        outline = shape_outline(kinds[label], cx, cy, r, rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 1.1)).round(2)
        mask = polygon_mask(outline, width, height)
        prior = colour_prior > 0 and rng.random() < colour_prior  # no draw when off: old outputs unchanged
        colour = _class_colour(rng, label, len(kinds)) if prior else _contrasting(rng, img)
        tex = _texture(rng, colour, width, height)
        img[mask] = tex[mask]
        for o in objects:  # later shapes occlude earlier ones
            o.mask &= ~mask
        objects.append(DrawnObject(label, outline, mask))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()

"""Shape outlines of the embedded datasets and their exact rasterisation.

Every class is a kind of shape. All shapes are polygons (a circle is a 48-gon), so the COCO polygon written to the
annotations is exactly the outline that was filled (:func:`polygon_mask` uses COCO's pixel-centre convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# Unit outlines, centred at the origin with circumradius about 1, counter-clockwise (x right, y down).


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _arc(cx: float, cy: float, r: float, t0: float, t1: float, n: int) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _ring(inner: float = 0.55, n: int = 40) -> np.ndarray:
    # One simple polygon with a zero-width "keyhole" seam: outer circle one way, inner circle back the other way.
    # COCO polygons cannot have holes; this traces the annulus as a single outline that rasterizes as a ring.
    outer = _arc(0, 0, 1.0, 0, 2 * np.pi, n + 1)
    hole = _arc(0, 0, inner, 2 * np.pi, 0, n + 1)
    return np.concatenate([outer, hole])


def _crescent(offset: float = 0.6, n: int = 32) -> np.ndarray:
    # Inside the unit circle, outside the unit circle shifted by ``offset`` along +x.
    x = offset / 2
    y = math.sqrt(1 - x * x)
    a = math.atan2(y, x)  # upper intersection seen from the first centre
    b = math.atan2(y, x - offset)  # ... and from the second centre
    outer = _arc(0, 0, 1.0, a, 2 * np.pi - a, n)
    inner = _arc(offset, 0, 1.0, 2 * np.pi - b, b, n)[1:-1]
    return np.concatenate([outer, inner]) - [[-0.3, 0]]


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y - 2.5], 1) / 17


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


SHAPES: dict[str, Callable[[], np.ndarray]] = {
    "circle": lambda: _regular(48),
    "square": lambda: _regular(4, np.pi / 4),
    "triangle": lambda: _regular(3, -np.pi / 2),
    "star": lambda: _star(5, 0.45),
    "cross": lambda: _poly(-0.3, -1, 0.3, -1, 0.3, -0.3, 1, -0.3, 1, 0.3, 0.3, 0.3, 0.3, 1, -0.3, 1, -0.3, 0.3, -1,
                           0.3, -1, -0.3, -0.3, -0.3),
    "ring": lambda: _ring(0.55),
    "diamond": lambda: _poly(0, -1, 0.55, 0, 0, 1, -0.55, 0),
    "hexagon": lambda: _regular(6),
    "crescent": lambda: _crescent(0.6),
    "heart": lambda: _heart(),
    "arrow": lambda: _poly(-1, -0.25, 0.2, -0.25, 0.2, -0.7, 1, 0, 0.2, 0.7, 0.2, 0.25, -1, 0.25),
    "ellipse": lambda: _regular(48) * [1.0, 0.5],
    "pentagon": lambda: _regular(5, -np.pi / 2),
    "rectangle": lambda: _poly(-1, -0.45, 1, -0.45, 1, 0.45, -1, 0.45),
    "semicircle": lambda: _arc(0, 0.4, 1.0, np.pi, 2 * np.pi, 25),
    "lshape": lambda: _poly(-0.7, -1, -0.15, -1, -0.15, 0.45, 0.7, 0.45, 0.7, 1, -0.7, 1),
    "tshape": lambda: _poly(-1, -0.8, 1, -0.8, 1, -0.3, 0.27, -0.3, 0.27, 1, -0.27, 1, -0.27, -0.3, -1, -0.3),
    "trapezoid": lambda: _poly(-0.45, -0.6, 0.45, -0.6, 1, 0.6, -1, 0.6),
    "chevron": lambda: _poly(-1, -0.8, 0, 0.1, 1, -0.8, 1, -0.1, 0, 0.8, -1, -0.1),
    "octagon": lambda: _regular(8, np.pi / 8),
}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
MAX_CLASSES = len(SHAPE_NAMES)


def shape_outline(kind: str, cx: float, cy: float, radius: float, angle: float, aspect: float) -> np.ndarray:
    """Outline of one shape in pixel coordinates: unit outline stretched by ``aspect`` in x, rotated, scaled.

    The outline always lies inside the circle of ``radius`` around (cx, cy).

    Returns:
        [N, 2] float64 vertices (x, y).
    """
    pts = SHAPES[kind]()  # [N, 2]
    pts = pts * [aspect, 1.0] / (np.linalg.norm(pts, axis=1).max() * max(aspect, 1.0))  # within the unit circle
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    return pts @ rot * radius + [cx, cy]  # [N, 2]


def polygon_mask(outline: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boolean [H, W] mask of the pixels whose centre ``(x + 0.5, y + 0.5)`` is inside the polygon (even-odd).

    This is COCO's convention (pycocotools ``annToMask`` rasterizes the same way up to sub-pixel rounding), so
    the polygon written to the annotations describes exactly the pixels that were painted.
    """
    x_lo, y_lo = (max(0, int(np.floor(v))) for v in outline.min(0))
    x_hi, y_hi = min(width, int(np.ceil(outline[:, 0].max())) + 1), min(height, int(np.ceil(outline[:, 1].max())) + 1)
    mask = np.zeros((height, width), dtype=bool)
    if x_lo >= x_hi or y_lo >= y_hi:
        return mask
    px = np.arange(x_lo, x_hi) + 0.5  # [w] pixel centres of the bounding box only
    py = (np.arange(y_lo, y_hi) + 0.5)[:, None]  # [h, 1]
    inside = mask[y_lo:y_hi, x_lo:x_hi]  # [h, w] view
    x0, y0 = outline[:, 0], outline[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1, strict=True):
        if ay == by:
            continue
        crosses = (ay > py) != (by > py)  # [h, 1] edge spans this row's centre line
        if not crosses.any():
            continue
        xc = ax + (py - ay) * (bx - ax) / (by - ay)  # [h, 1] x where the edge meets the row
        inside ^= crosses & (px < xc)  # [h, w] ray to the right crosses the edge
    return mask

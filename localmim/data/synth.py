"""Embedded mini datasets in the real on-disk layouts (ImageNet, ADE20K, COCO), generated from a seed.

Every class is a *kind of shape* (circle, square, triangle, star, ...). Each image draws shapes with a random
pose (position, size, rotation, slight aspect jitter), a random fill colour and texture (solid, stripes, checker,
noise) over a random background (solid, gradient, low-frequency noise), on an image of random size and aspect.
The class is therefore decidable from the content only, so accuracy above chance means something was learned.

All shapes are polygons (a circle is a 48-gon), so the COCO polygon segmentation is the exact outline that was
filled; the ADE20K annotation is the same filled mask, pixel for pixel.

Determinism: each image draws from its own ``numpy.random.default_rng([seed, dataset, split, index])``, and
the encoders (PIL JPEG/PNG, ``json.dumps``) are deterministic, so the same seed gives byte-identical files.
Only numpy and PIL are used.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from localmim.utils.io import clean_stale_tmp

# Share of embedded ImageNet images drawn in their class's typical hue. With random colours only (0.0), 60 images
# per class were too few for anything to generalise: a 4-layer CNN reached ~25% val top-1 and the ViT-Tiny
# fine-tune stayed at chance even on train; with 0.7 the CNN reaches ~65% and the ViT rises within 3 epochs.
IMAGENET_COLOUR_PRIOR = 0.7

# ---------------------------------------------------------------------------------------------------- shapes
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


# ---------------------------------------------------------------------------------------------------- pixels


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


def _image_size(rng: np.random.Generator, min_side: int, max_side: int, max_aspect: float = 2.0) -> tuple[int, int]:
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


# ---------------------------------------------------------------------------------------------------- datasets
_DATASET_IDS = {"imagenet": 0, "ade20k": 1, "coco": 2}
_SPLIT_IDS = {"train": 0, "val": 1}


def _rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _DATASET_IDS[dataset], _SPLIT_IDS[split], index])


def class_dir_name(index: int, kind: str) -> str:
    """ImageNet-synset-like directory name, e.g. ``n00000003_star``; sorted order == class index order."""
    return f"n{index:08d}_{kind}"


def _check_classes(n: int, what: str) -> None:
    if not 1 <= n <= MAX_CLASSES:
        raise ValueError(f"{what}={n}: there are {MAX_CLASSES} shape kinds, need 1 <= {what} <= {MAX_CLASSES}")


def write_imagenet(
    root: Path, *, seed: int, num_classes: int, per_class: dict[str, int], min_side: int, max_side: int, quality: int,
    colour_prior: float = 0.0,
) -> dict[str, int]:
    """``root/{train,val}/<class-dir>/<name>.JPEG``, one shape of the class kind per image.

    ``colour_prior``: share of images whose shape has its class's typical hue (0 = colour carries no label).

    Returns:
        number of images per split.
    """
    _check_classes(num_classes, "num_classes")
    kinds = list(SHAPE_NAMES[:num_classes])
    counts = {}
    for split, n in per_class.items():
        for c, kind in enumerate(kinds):
            d = root / split / class_dir_name(c, kind)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                idx = c * n + i
                rng = _rng(seed, "imagenet", split, idx)
                w, h = _image_size(rng, min_side, max_side)
                img, _ = render(rng, kinds, [c], w, h, (0.28, 0.45), avoid_overlap=True, colour_prior=colour_prior)
                name = f"{d.name[:9]}_{i:05d}.JPEG" if split == "train" else f"ILSVRC2012_val_{idx + 1:08d}.JPEG"
                (d / name).write_bytes(encode_jpeg(img, quality))
        counts[split] = n * num_classes
    return counts


def _num_objects(rng: np.random.Generator, num_classes: int, hi: int = 4) -> list[int]:
    return [int(x) for x in rng.integers(0, num_classes, int(rng.integers(1, hi + 1)))]


def write_ade20k(
    root: Path, *, seed: int, num_classes: int, sizes: dict[str, int], min_side: int, max_side: int, quality: int
) -> dict[str, int]:
    """``root/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}``.

    Annotations are 8-bit PNGs: 0 = background (other/ignore), ``k + 1`` = shape kind ``k``.
    """
    _check_classes(num_classes, "seg_classes")
    kinds = list(SHAPE_NAMES[:num_classes])
    base = root / "ADEChallengeData2016"
    for split, n in sizes.items():
        ade_split, tag = ("training", "train") if split == "train" else ("validation", "val")
        img_dir, ann_dir = base / "images" / ade_split, base / "annotations" / ade_split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = _rng(seed, "ade20k", split, i)
            w, h = _image_size(rng, min_side, max_side)
            img, objs = render(rng, kinds, _num_objects(rng, num_classes), w, h, (0.12, 0.3), avoid_overlap=False)
            ann = np.zeros((h, w), np.uint8)
            for o in objs:
                ann[o.mask] = o.label + 1
            stem = f"ADE_{tag}_{i + 1:08d}"
            (img_dir / f"{stem}.jpg").write_bytes(encode_jpeg(img, quality))
            (ann_dir / f"{stem}.png").write_bytes(encode_png(ann))
    return dict(sizes)


def write_coco(
    root: Path, *, seed: int, num_classes: int, sizes: dict[str, int], min_side: int, max_side: int, quality: int
) -> dict[str, int]:
    """``root/{train2017,val2017}/*.jpg`` and ``root/annotations/instances_{split}2017.json``.

    Objects do not overlap, so each polygon is exactly the visible object; ``bbox`` is the polygon's extent
    ``[x, y, w, h]`` and ``area`` the number of pixels painted for the object.
    """
    _check_classes(num_classes, "coco classes")
    kinds = list(SHAPE_NAMES[:num_classes])
    categories = [{"id": k + 1, "name": kind, "supercategory": "shape"} for k, kind in enumerate(kinds)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 0
    for split, n in sizes.items():
        img_dir = root / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            rng = _rng(seed, "coco", split, i)
            w, h = _image_size(rng, min_side, max_side)
            img, objs = render(rng, kinds, _num_objects(rng, num_classes), w, h, (0.12, 0.3), avoid_overlap=True)
            image_id = i + 1 + (0 if split == "train" else 1_000_000)
            name = f"{image_id:012d}.jpg"
            (img_dir / name).write_bytes(encode_jpeg(img, quality))
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for o in objs:
                ann_id += 1
                poly = o.outline
                x0, y0 = poly.min(0)
                x1, y1 = poly.max(0)
                annotations.append({
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": o.label + 1,
                    "segmentation": [[float(v) for v in poly.reshape(-1)]],
                    "area": float(o.mask.sum()),
                    "bbox": [float(x0), float(y0), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                    "iscrowd": 0,
                })
        doc = {
            "info": {"description": f"localmim synthetic shapes, seed {seed}", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return dict(sizes)


def generate_all(
    out: str | Path,
    *,
    seed: int,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    min_side: int,
    max_side: int,
    seg_classes: int,
    seg_train: int,
    seg_val: int,
    coco_train: int,
    coco_val: int,
    jpeg_quality: int,
    colour_prior: float = IMAGENET_COLOUR_PRIOR,
) -> dict[str, int]:
    """Write ``out/imagenet``, ``out/ade20k`` and ``out/coco``; each appears atomically (built in a temp dir,
    then renamed into place, replacing an older copy).

    Returns:
        image counts, e.g. ``{"imagenet_train": 600, ...}``.
    """
    if min_side > max_side:
        raise ValueError(f"min_side ({min_side}) must be <= max_side ({max_side})")
    if not 0.0 <= colour_prior <= 1.0:
        raise ValueError(f"colour_prior={colour_prior} must be in [0, 1]")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)  # temp dirs of a killed earlier run
    tmp = out / f".synth.tmp-{os.getpid()}"
    common = dict(seed=seed, min_side=min_side, max_side=max_side, quality=jpeg_quality)
    try:
        counts = {}
        n = write_imagenet(
            tmp / "imagenet", num_classes=num_classes, per_class={"train": train_per_class, "val": val_per_class},
            colour_prior=colour_prior, **common,
        )
        counts.update({f"imagenet_{k}": v for k, v in n.items()})
        n = write_ade20k(tmp / "ade20k", num_classes=seg_classes, sizes={"train": seg_train, "val": seg_val}, **common)
        counts.update({f"ade20k_{k}": v for k, v in n.items()})
        n = write_coco(tmp / "coco", num_classes=seg_classes, sizes={"train": coco_train, "val": coco_val}, **common)
        counts.update({f"coco_{k}": v for k, v in n.items()})
        for name in ("imagenet", "ade20k", "coco"):
            _replace_dir(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".{dst.name}.old.tmp-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)

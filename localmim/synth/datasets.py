"""Writers of the embedded datasets in the real on-disk layouts: ImageNet ImageFolder, ADE20K, COCO.

Determinism: each image draws from its own ``numpy.random.default_rng([seed, dataset, split, index])``, and the
encoders (PIL JPEG/PNG, ``json.dumps``) are deterministic, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from localmim.synth.draw import DrawnObject, encode_jpeg, encode_png, image_size, render
from localmim.synth.shapes import MAX_CLASSES, SHAPE_NAMES
from localmim.utils.io import clean_stale_tmp, replace_dir

# Share of embedded ImageNet images drawn in their class's typical hue. With random colours only (0.0), 60 images
# per class were too few for anything to generalise: a 4-layer CNN reached ~25% val top-1 and the ViT-Tiny
# fine-tune stayed at chance even on train; with 0.7 the CNN reaches ~65% and the ViT rises within 3 epochs.
IMAGENET_COLOUR_PRIOR = 0.7

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
                w, h = image_size(rng, min_side, max_side)
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
            w, h = image_size(rng, min_side, max_side)
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
            w, h = image_size(rng, min_side, max_side)
            img, objs = render(rng, kinds, _num_objects(rng, num_classes), w, h, (0.12, 0.3), avoid_overlap=True)
            image_id = i + 1 + (0 if split == "train" else 1_000_000)
            name = f"{image_id:012d}.jpg"
            (img_dir / name).write_bytes(encode_jpeg(img, quality))
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for o in objs:
                ann_id += 1
                annotations.append(_coco_annotation(ann_id, image_id, o))
        doc = {
            "info": {"description": f"localmim synthetic shapes, seed {seed}", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return dict(sizes)


def _coco_annotation(ann_id: int, image_id: int, obj: DrawnObject) -> dict:
    """COCO instance record of one object: its outline as the polygon, ``bbox`` the outline's extent, ``area`` the
    number of pixels painted."""
    poly = obj.outline  # [N, 2]
    x0, y0 = poly.min(0)
    x1, y1 = poly.max(0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.label + 1,
        "segmentation": [[float(v) for v in poly.reshape(-1)]],
        "area": float(obj.mask.sum()),
        "bbox": [float(x0), float(y0), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
        "iscrowd": 0,
    }


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
    dense_min_side: int | None = None,
    dense_max_side: int | None = None,
) -> dict[str, int]:
    """Write ``out/imagenet``, ``out/ade20k`` and ``out/coco``; each appears atomically (built in a temp dir,
    then renamed into place, replacing an older copy). ``min_side``/``max_side`` bound the ImageNet images,
    ``dense_min_side``/``dense_max_side`` the ADE20K and COCO ones (None: the ImageNet bounds).

    Returns:
        image counts, e.g. ``{"imagenet_train": 600, ...}``.
    """
    dense_min_side = min_side if dense_min_side is None else dense_min_side
    dense_max_side = max_side if dense_max_side is None else dense_max_side
    for lo, hi, a, b in (("min_side", "max_side", min_side, max_side),
                         ("dense_min_side", "dense_max_side", dense_min_side, dense_max_side)):
        if a > b:
            raise ValueError(f"{lo} ({a}) must be <= {hi} ({b})")
    if not 0.0 <= colour_prior <= 1.0:
        raise ValueError(f"colour_prior={colour_prior} must be in [0, 1]")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)  # temp dirs of a killed earlier run
    tmp = out / f".synth.tmp-{os.getpid()}"
    common = dict(seed=seed, min_side=dense_min_side, max_side=dense_max_side, quality=jpeg_quality)
    try:
        counts = {}
        n = write_imagenet(
            tmp / "imagenet", num_classes=num_classes, per_class={"train": train_per_class, "val": val_per_class},
            colour_prior=colour_prior, seed=seed, min_side=min_side, max_side=max_side, quality=jpeg_quality,
        )
        counts.update({f"imagenet_{k}": v for k, v in n.items()})
        n = write_ade20k(tmp / "ade20k", num_classes=seg_classes, sizes={"train": seg_train, "val": seg_val}, **common)
        counts.update({f"ade20k_{k}": v for k, v in n.items()})
        n = write_coco(tmp / "coco", num_classes=seg_classes, sizes={"train": coco_train, "val": coco_val}, **common)
        counts.update({f"coco_{k}": v for k, v in n.items()})
        for name in ("imagenet", "ade20k", "coco"):
            replace_dir(tmp / name, out / name)  # the old copy kept until the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


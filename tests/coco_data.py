"""Tiny COCO layouts for the detection tests: a hand-written one (rectangles, exact masks) and the synth one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def rect_polygon(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def hand_coco(root: Path, split: str = "val", size: tuple[int, int] = (100, 80), crowd: bool = False) -> Path:
    """``root`` with two images of ``size`` (w, h): image 1 holds two rectangles (categories 1 and 2, plus a crowd
    region when ``crowd``), image 2 none. Returns the annotation file."""
    w, h = size
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
    boxes = [(10, 10, 20, 20, 1), (50, 30, 30, 25, 2)] + ([(5, 50, 20, 20, 1)] if crowd else [])
    anns = [{"id": k + 1, "image_id": 1, "category_id": c, "bbox": [x, y, bw, bh], "area": float(bw * bh),
             "segmentation": [rect_polygon(x, y, bw, bh)], "iscrowd": int(k == 2)}
            for k, (x, y, bw, bh, c) in enumerate(boxes)]
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "a", "supercategory": "s"}, {"id": 2, "name": "b", "supercategory": "s"}]}
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(doc))
    return path


def synth_coco(root: Path, train: int = 6, val: int = 3, seed: int = 0) -> Path:
    """The embedded generator's COCO layout (8 shape classes) with ``train`` / ``val`` images."""
    from localmim.synth import write_coco

    write_coco(root, seed=seed, num_classes=8, sizes={"train": train, "val": val}, min_side=40, max_side=72,
               quality=90)
    return root


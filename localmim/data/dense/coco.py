"""COCO detection / instance-segmentation data (method §9.2): annotation checks and datasets (the augmentation is
:mod:`localmim.data.dense.coco_transforms`).

Layout: ``root/{train2017,val2017}/*.jpg`` and ``root/annotations/instances_{split}2017.json``. Files are read
through pycocotools and torchvision's ``CocoDetection`` + ``wrap_dataset_for_transforms_v2`` (boxes, masks and
labels as tv_tensors); augmentation is torchvision.transforms.v2.

Every annotation file is checked first (:func:`load_coco`): an annotation whose image is not listed, an image
file that is missing or does not decode completely (:func:`localmim.data.raw.imagefile.check_image_files`: worker
processes, results cached by path, size and mtime), or whose size differs from the JSON, a box with non-positive
width or height or outside the image, a category id not in ``categories``, or a malformed polygon / RLE is either
an error naming the file and id (``on_bad="fail"``) or skipped with its reason (``on_bad="skip"``). Counts reconcile:
``found = used + skipped`` for images and annotations alike. Crowd annotations are kept for evaluation (COCOeval
treats them as ignore regions) and dropped from training (listed as skipped with their reason). Images without
annotations stay: they are negative samples. A usable file worth naming (PNG content under a ``.jpg`` name: PIL
decodes by content) is listed in the report's ``notes``.

A file that fails to load later (damaged after the check) follows the ``skips`` rule of :func:`coco_dataset`
(:class:`localmim.data.raw.imagefile.LoadSkips`): in training the next image takes its place (every rank keeps its
batch size and step count), in evaluation the sample is left out and
:class:`localmim.eval.detection.ScoredGroundTruth` drops its image from the scoring; :meth:`CocoReport.add_load_skips`
moves it from used to skipped in the report.

Labels: model labels are ``1..K`` in sorted category-id order (0 is the background of torchvision's detectors);
:attr:`CocoSplit.label_to_cat` maps them back for the results file.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from localmim.data.raw.imagefile import FileCheck, Loadable, LoadSkips, check_image_files, read_image

_BOX_TOL = 1.0  # pixels a box may stick out of the image (rounding in real annotation files)


class CocoError(ValueError):
    """Bad COCO input under ``on_bad='fail'``; the message names the file and the image/annotation id."""


@dataclass
class CocoReport:
    """What :func:`load_coco` found, used and skipped (``kind`` is ``image`` or ``annotation``)."""

    images_found: int = 0
    images_used: int = 0
    annotations_found: int = 0
    annotations_used: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)  # usable images worth naming

    def skip(self, kind: str, id_: Any, reason: str) -> None:
        self.skipped.append({"kind": kind, "id": id_, "reason": reason})

    def add_load_skips(self, coco: Any, image_dir: Path, records: list[dict[str, Any]]) -> None:
        """Move the images that failed to load (:meth:`LoadSkips.records`) and their annotations from used to
        skipped; ``coco``: the split's index of used images."""
        by_file = {str(image_dir / img["file_name"]): iid for iid, img in coco.imgs.items()}
        for rec in records:
            iid = by_file.get(rec["file"])
            if iid is None:
                continue
            self.skip("image", iid, f"{rec['file']}: {rec['reason']}")
            anns = coco.imgToAnns.get(iid, [])
            for ann in anns:
                self.skip("annotation", ann["id"], f"its image {iid!r} was skipped (failed to load)")
            self.images_used -= 1
            self.annotations_used -= len(anns)

    def reconciles(self) -> bool:
        n_img = sum(s["kind"] == "image" for s in self.skipped)
        n_ann = sum(s["kind"] == "annotation" for s in self.skipped)
        return (self.images_found == self.images_used + n_img
                and self.annotations_found == self.annotations_used + n_ann)

    def to_dict(self) -> dict[str, Any]:
        return {"images_found": self.images_found, "images_used": self.images_used,
                "annotations_found": self.annotations_found, "annotations_used": self.annotations_used,
                "skipped": self.skipped, "notes": self.notes}


@dataclass
class CocoSplit:
    """A checked split: the pycocotools index of the kept images/annotations, the image folder and the report."""

    coco: Any  # pycocotools.coco.COCO
    image_dir: Path
    report: CocoReport
    checks: dict[str, FileCheck] = field(default_factory=dict, repr=False)  # full-decode results, by path

    @property
    def cat_ids(self) -> list[int]:
        return sorted(self.coco.cats)

    @property
    def label_to_cat(self) -> dict[int, int]:
        return {i + 1: c for i, c in enumerate(self.cat_ids)}


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_file)`` of ``split`` (``train`` / ``val``) in the COCO layout."""
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


def _bad_segmentation(seg: Any, h: int, w: int) -> str | None:
    """Why ``seg`` is not a usable polygon list / RLE of an ``h x w`` image, or None."""
    if isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not isinstance(size, list | tuple) or list(size) != [h, w]:
            return f"RLE segmentation needs 'counts' and size [{h}, {w}], got size {size!r}"
        return None
    if not isinstance(seg, list) or not seg:
        return f"segmentation must be a non-empty list of polygons or an RLE dict, got {type(seg).__name__}"
    for poly in seg:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            n = len(poly) if isinstance(poly, list) else type(poly).__name__
            return f"malformed polygon (need an even number >= 6 of coordinates, got {n})"
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in poly):
            return "malformed polygon (non-numeric or non-finite coordinate)"
    return None


def _bad_annotation(ann: dict, img: dict | None, cats: set[int]) -> str | None:
    """Why annotation ``ann`` cannot be used, or None (``img``: its image entry, None when not listed)."""
    if img is None:
        return f"image {ann.get('image_id')!r} is not in 'images'"
    if ann.get("category_id") not in cats:
        return f"category_id {ann.get('category_id')!r} is not in 'categories'"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) and math.isfinite(v)
                                                             for v in box)):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {box!r}"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"bbox {box} has non-positive width or height"
    if x < -_BOX_TOL or y < -_BOX_TOL or x + w > img["width"] + _BOX_TOL or y + h > img["height"] + _BOX_TOL:
        return f"bbox {box} lies outside the {img['width']}x{img['height']} image"
    return _bad_segmentation(ann.get("segmentation"), img["height"], img["width"])


def _bad_image(img: dict, image_dir: Path, checks: dict[str, FileCheck]) -> str | None:
    path = image_dir / str(img.get("file_name", ""))
    check = checks[str(path)]
    if check.reason is not None:
        return f"image file {path} is missing" if check.reason.startswith("missing") else f"{path}: {check.reason}"
    if (check.width, check.height) != (img.get("width"), img.get("height")):
        return (f"{path} is {check.width}x{check.height}, the annotation file says "
                f"{img.get('width')}x{img.get('height')}")
    return None


def _read_instances(root: str | Path, split: str) -> tuple[Path, Path, dict, set[int]]:
    """The split's image folder, annotation file, parsed JSON and category ids; clear errors when missing/malformed."""
    import json

    image_dir, ann_file = split_paths(root, split)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: COCO annotation file not found (expected {Path(root)}/annotations/"
                                f"instances_{split}2017.json)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: COCO image folder not found")
    try:
        doc = json.loads(ann_file.read_text())
        _, cats = doc["images"], doc["categories"]  # KeyError/TypeError: not an instances file
        doc = {**doc, "annotations": doc.get("annotations", [])}
        cat_ids = {int(c["id"]) for c in cats}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CocoError(f"{ann_file}: not a COCO instances file ({e.__class__.__name__}: {e})") from None
    return image_dir, ann_file, doc, cat_ids


def load_coco(root: str | Path, split: str, on_bad: str = "skip", train: bool = False, *,
              checks: dict[str, FileCheck] | None = None, cache: str | Path | None = None, workers: int = 0,
              progress: bool = False) -> CocoSplit:
    """Read and check ``split`` of the COCO layout at ``root`` (see the module docstring).

    Args:
        on_bad: ``skip`` (record the reason, go on) or ``fail`` (raise :class:`CocoError` at the first problem).
        train: drop crowd annotations (skipped with their reason; never an error).
        checks: full-decode results already at hand (another rank's :attr:`CocoSplit.checks`); images not in it
            are checked here, in ``workers`` processes (0 = every CPU), through the ``cache`` file if given.

    Raises:
        FileNotFoundError: the annotation file or image folder is missing.
        CocoError: malformed JSON, or a bad image/annotation under ``on_bad='fail'``.
    """
    from pycocotools.coco import COCO

    if on_bad not in ("skip", "fail"):
        raise ValueError(f"on_bad must be skip|fail, got {on_bad!r}")
    image_dir, ann_file, doc, cat_ids = _read_instances(root, split)
    images, anns = doc["images"], doc["annotations"]
    rep = CocoReport(images_found=len(images), annotations_found=len(anns))

    def bad(kind: str, id_: Any, reason: str) -> None:
        if on_bad == "fail":
            raise CocoError(f"{ann_file}: {kind} id {id_!r}: {reason}")
        rep.skip(kind, id_, reason)

    paths = [str(image_dir / str(img.get("file_name", ""))) for img in images]
    checks = dict(checks or {})
    checks |= check_image_files([(p, "image") for p in dict.fromkeys(paths) if p not in checks], cache=cache,
                                workers=workers, progress=progress, desc=f"check COCO {split}")
    kept_images = _keep_images(images, image_dir, bad, checks)
    rep.notes = [{"kind": "image", "id": iid, "file": p, "note": checks[p].note}
                 for iid, p in ((img["id"], str(image_dir / img["file_name"])) for img in kept_images.values())
                 if checks[p].note]
    kept_anns = _keep_annotations(anns, {img.get("id") for img in images}, kept_images, cat_ids, train, bad, rep)
    rep.images_used, rep.annotations_used = len(kept_images), len(kept_anns)
    coco = COCO()
    coco.dataset = {"images": list(kept_images.values()), "annotations": kept_anns, "categories": doc["categories"],
                    **{k: doc[k] for k in ("info", "licenses") if k in doc}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return CocoSplit(coco, image_dir, rep, {p: checks[p] for p in paths})


def _keep_images(images: list[dict], image_dir: Path, bad: Any, checks: dict[str, FileCheck]) -> dict[Any, dict]:
    """The readable images with unique ids, by id; ``bad`` records (or raises for) the others."""
    kept: dict[Any, dict] = {}
    for img in images:
        why = _bad_image(img, image_dir, checks)
        if why is None and img.get("id") in kept:
            why = "duplicate image id"
        if why is None:
            kept[img["id"]] = img
        else:
            bad("image", img.get("id"), why)
    return kept


def _keep_annotations(anns: list[dict], listed: set, kept_images: dict[Any, dict], cat_ids: set[int], train: bool,
                      bad: Any, rep: CocoReport) -> list[dict]:
    """The valid annotations (crowd ones dropped in training); those of skipped images are skipped, not errors."""
    kept, seen = [], set()
    for ann in anns:
        aid, iid = ann.get("id"), ann.get("image_id")
        why = "duplicate annotation id" if aid in seen else None
        if why is None and iid in listed and iid not in kept_images:
            rep.skip("annotation", aid, f"its image {iid!r} was skipped")
            continue
        why = why or _bad_annotation(ann, kept_images.get(iid), cat_ids)
        seen.add(aid)
        if why is not None:
            bad("annotation", aid, why)
        elif train and ann.get("iscrowd", 0):
            rep.skip("annotation", aid, "crowd annotation (ignored in training)")
        else:
            kept.append({**ann, "iscrowd": int(ann.get("iscrowd", 0)),
                         "area": float(ann.get("area", ann["bbox"][2] * ann["bbox"][3]))})
    return kept


# ----------------------------------------------------------------------------------------------- datasets


def _coco_dataset_class():
    from torchvision.datasets import CocoDetection, VisionDataset

    class _CheckedCoco(CocoDetection):
        """torchvision's CocoDetection over an already-built (checked) pycocotools index; images through
        :func:`localmim.data.raw.imagefile.read_image` (a decode error names the file)."""

        def __init__(self, image_dir: Path, coco: Any, transforms=None):
            VisionDataset.__init__(self, str(image_dir), transforms=transforms)
            self.coco = coco
            self.ids = sorted(coco.imgs)

        def _load_image(self, id: int):  # noqa: A002 - torchvision's signature
            return read_image(Path(self.root) / self.coco.imgs[id]["file_name"])

    return _CheckedCoco


def coco_dataset(split: CocoSplit, transforms=None, skips: LoadSkips | None = None,
                 train: bool = False) -> torch.utils.data.Dataset:
    """``(image, target)`` samples of a checked split, targets as tv_tensors (``image_id``, ``boxes`` XYXY,
    ``masks``, ``labels`` = category ids); ``transforms(image, target)`` runs after the tv_tensor wrapping.

    An image that no longer decodes follows ``skips`` (default: raise naming the file); ``train`` substitutes
    the next image, otherwise the sample is None (see :class:`localmim.data.raw.imagefile.Loadable`)."""
    from torchvision.datasets import wrap_dataset_for_transforms_v2

    base = _coco_dataset_class()(split.image_dir, split.coco, transforms=transforms)
    files = [str(split.image_dir / split.coco.imgs[i]["file_name"]) for i in base.ids]
    ds = wrap_dataset_for_transforms_v2(base, target_keys={"image_id", "boxes", "masks", "labels"})
    return Loadable(ds, files, skips or LoadSkips(), substitute=train)


def collate(batch: list[tuple[Any, dict]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Lists of plain tensors as torchvision's detectors take them (``masks`` uint8, ``labels`` int64); samples
    left out at load time (None) are dropped."""
    images, targets = [], []
    for image, t in filter(None, batch):
        images.append(image.as_subclass(torch.Tensor))
        targets.append({"image_id": int(t["image_id"]), "boxes": t["boxes"].as_subclass(torch.Tensor).float(),
                        "labels": t["labels"].as_subclass(torch.Tensor).long(),
                        "masks": t["masks"].as_subclass(torch.Tensor).to(torch.uint8)})
    return images, targets

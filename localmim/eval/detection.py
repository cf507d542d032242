"""COCO box / mask evaluation (method §9.2): detector outputs -> COCO results -> pycocotools ``COCOeval``.

Results follow the standard COCO results format, so anyone can re-score the written file with pycocotools:
``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}``, boxes and masks at the
original image size (torchvision's detectors map their outputs back to it), masks thresholded at 0.5 and
encoded with ``pycocotools.mask.encode`` (``counts`` as a UTF-8 string). Metrics are COCOeval's ``stats[:6]``
unchanged (0..1 scale; -1 where COCOeval has no ground truth in an area range).
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from localmim.runtime.precision import autocast

if TYPE_CHECKING:
    from localmim.data.dense.coco import CocoSplit
    from localmim.data.raw.imagefile import LoadSkips

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def to_coco_results(image_id: int, output: dict[str, torch.Tensor], label_to_cat: dict[int, int],
                    mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's detector output (``boxes`` XYXY ``[N, 4]``, ``scores [N]``, ``labels [N]``, ``masks
    [N, 1, H, W]`` probabilities) -> COCO result dicts."""
    from pycocotools import mask as mask_util

    boxes = output["boxes"].detach().float().cpu().numpy().astype(np.float64)  # [N, 4]
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    masks = None
    if "masks" in output:
        binary = (output["masks"].detach()[:, 0] > mask_threshold).cpu().numpy()  # [N, H, W] bool
        masks = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))  # N RLEs
    out = []
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        r = {"image_id": int(image_id), "category_id": int(label_to_cat[int(labels[i])]),
             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": round(scores[i], 5)}
        if masks is not None:
            r["segmentation"] = {"size": [int(v) for v in masks[i]["size"]], "counts": masks[i]["counts"].decode()}
        out.append(r)
    return out


def coco_eval(gt, results: list[dict[str, Any]], iou_types=IOU_TYPES) -> dict[str, float]:
    """COCOeval of ``results`` against the pycocotools index ``gt``: ``{"bbox_AP": .., "segm_APl": ..}``.

    With no detections at all pycocotools' ``loadRes`` cannot build an index; every AP is then 0 (what COCOeval
    reports for categories with ground truth and no detections). ``gt`` is left untouched (COCOeval rewrites the
    ground-truth segmentations as RLE in place, so it scores a copy).
    """
    import copy

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {f"{t}_{m}": 0.0 for t in iou_types for m in METRIC_NAMES}
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary table
        gt_copy = COCO()
        gt_copy.dataset = copy.deepcopy(gt.dataset)
        gt_copy.createIndex()
        gt = gt_copy
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds fields in place: keep ours clean
        for t in iou_types:
            ev = COCOeval(gt, dt, t)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            metrics.update({f"{t}_{m}": float(v) for m, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)})
    return metrics


def prior_results(train_gt, val_gt, max_per_image: int = 100) -> list[dict[str, Any]]:
    """COCO results of a detector that never looks at the image: the chance level of box and mask AP.

    Every val image gets the same guesses: the training objects (not crowd, polygon masks), each box and polygon in
    coordinates relative to its own image, rescaled to the val image, scored by the share of its category among the
    training objects; the most frequent categories first, at most ``max_per_image`` (COCOeval's ``maxDets``).
    """
    from collections import Counter

    from pycocotools import mask as mask_util

    anns = [a for a in train_gt.dataset["annotations"]
            if not a.get("iscrowd", 0) and isinstance(a["segmentation"], list)]
    share, total = Counter(a["category_id"] for a in anns), max(len(anns), 1)
    anns = sorted(anns, key=lambda a: -share[a["category_id"]])[:max_per_image]  # stable: file order within a class
    rel = []  # (category, relative box, relative polygons, score)
    for a in anns:
        img = train_gt.imgs[a["image_id"]]
        w, h = float(img["width"]), float(img["height"])
        x, y, bw, bh = a["bbox"]
        polys = [[v / (w if i % 2 == 0 else h) for i, v in enumerate(p)] for p in a["segmentation"]]
        rel.append((a["category_id"], (x / w, y / h, bw / w, bh / h), polys, share[a["category_id"]] / total))
    out = []
    for img in val_gt.dataset["images"]:
        w, h = img["width"], img["height"]
        for cat, (x, y, bw, bh), polys, score in rel:
            scaled = [[v * (w if i % 2 == 0 else h) for i, v in enumerate(p)] for p in polys]
            rle = mask_util.merge(mask_util.frPyObjects(scaled, h, w))
            out.append({"image_id": img["id"], "category_id": cat, "score": round(score, 5),
                        "bbox": [round(x * w, 2), round(y * h, 2), round(bw * w, 2), round(bh * h, 2)],
                        "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
    return out


@torch.no_grad()
def predict(model, loader, device: torch.device, label_to_cat: dict[int, int],
            amp_dtype: torch.dtype | None = None, keep_images: int = 0):
    """COCO results of ``model`` on ``loader`` (batches of ``(images, targets)``), and the first
    ``keep_images`` ``(image uint8 [3, H, W], output)`` pairs for a picture."""
    model.eval()
    results, kept = [], []
    for images, targets in loader:
        if not images:  # every sample of the batch was left out at load time (a damaged file)
            continue
        images = [im.to(device, non_blocking=True) for im in images]
        with autocast(device, amp_dtype):
            outputs = model(images)
        for im, t, o in zip(images, targets, outputs, strict=True):
            results += to_coco_results(t["image_id"], o, label_to_cat)
            if len(kept) < keep_images:
                kept.append(((im * 255).round().to(torch.uint8).cpu(), {k: v.float().cpu() for k, v in o.items()}))
    return results, kept


def render(kept, cat_names: dict[int, str], label_to_cat: dict[int, int], score_threshold: float = 0.3,
           size: int = 256) -> torch.Tensor:
    """A ``uint8 [3, H, W]`` grid of images with their predicted masks and boxes (score >= threshold)."""
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

    tiles = []
    for image, out in kept:
        keep = out["scores"] >= score_threshold
        canvas = image
        if keep.any():
            canvas = draw_segmentation_masks(canvas, out["masks"][keep, 0] > 0.5, alpha=0.45)
            names = [f"{cat_names[label_to_cat[int(lab)]]} {s:.2f}" for lab, s in
                     zip(out["labels"][keep].tolist(), out["scores"][keep].tolist(), strict=True)]
            canvas = draw_bounding_boxes(canvas, out["boxes"][keep], labels=names, colors="yellow")
        h, w = canvas.shape[-2:]
        scale = size / max(h, w)
        canvas = F.resize(canvas, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
        tiles.append(F.pad(canvas, [0, 0, size - canvas.shape[-1], size - canvas.shape[-2]]))
    if not tiles:
        return torch.zeros(3, size, size, dtype=torch.uint8)
    return make_grid(tiles, nrow=min(4, len(tiles)), padding=2)


class ScoredGroundTruth:
    """The val index as COCOeval scores it (``coco_eval`` reads ``dataset``): ``split.coco`` without the images
    recorded in ``skips`` as failed to load, read when asked (at scoring time, after every rank's predictions are
    in), so a skipped image's objects are neither found nor missed. Every other attribute is ``split.coco``'s."""

    def __init__(self, split: CocoSplit, skips: LoadSkips):
        self.split, self.skips = split, skips

    @property
    def dataset(self) -> dict[str, Any]:
        d = self.split.coco.dataset
        files = {r["file"] for r in self.skips.records()}
        bad = {img["id"] for img in d["images"] if str(self.split.image_dir / img["file_name"]) in files}
        if not bad:
            return d
        return {**d, "images": [i for i in d["images"] if i["id"] not in bad],
                "annotations": [a for a in d["annotations"] if a["image_id"] not in bad]}

    def __getattr__(self, name: str):
        if name in ("split", "skips"):  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.split.coco, name)

"""Semantic-segmentation evaluation (method §9.1): inference modes and mIoU / mAcc / aAcc.

- A confusion matrix ``[K, K]`` (rows: ground truth, columns: prediction; torchmetrics' ``MulticlassConfusionMatrix``
  with ``ignore_index=255``) is accumulated on the device over the pixels whose label is not the ignore value, summed
  across ranks once at the end (torchmetrics' sync on ``compute``).
- IoU_k = TP / (TP + FP + FN), Acc_k = TP / (TP + FN); mIoU averages over the classes present in the ground truth
  or the prediction (union > 0), mAcc over the classes present in the ground truth, aAcc = ΣTP / #labelled pixels.
- Inference: ``whole`` (the image at the test scale in one pass) or ``slide`` (``crop × crop`` windows every
  ``stride`` pixels, logits averaged where windows overlap, MMSeg's grid); logits are resized (bilinear) to the
  annotation's size before the argmax.
- :func:`render`: image | ground truth | prediction rows, label maps coloured with torchvision's palette.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from localmim.runtime.precision import autocast

IGNORE = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore: int = IGNORE) -> Tensor:
    """``[K, K]`` int64 counts of (target, pred) pairs over the labelled pixels (``target != ignore``)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(pred.reshape(-1), target.reshape(-1).long(), num_classes, ignore_index=ignore,
                                       validate_args=False)


def scores(cm: Tensor) -> dict:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / Acc (NaN where the class is left out) from ``cm``."""
    cm = cm.double().cpu()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    return {"mIoU": 100 * float(iou.nanmean()), "mAcc": 100 * float(acc.nanmean()),
            "aAcc": 100 * float(tp.sum() / cm.sum().clamp(min=1)),
            "per_class_iou": [100 * float(v) for v in iou], "per_class_acc": [100 * float(v) for v in acc]}


def _logits(model, images: Tensor) -> Tensor:
    return model(images)[0].float()


@torch.no_grad()
def slide_logits(model, images: Tensor, num_classes: int, crop: int, stride: int) -> Tensor:
    """``[B, K, H, W]`` logits averaged over ``crop`` windows placed every ``stride`` px (the last one flush with
    the border; one window when the image is no larger than ``crop``)."""
    b, _, h, w = images.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out[..., y1:y2, x1:x2] += _logits(model, images[..., y1:y2, x1:x2])
            count[..., y1:y2, x1:x2] += 1
    return out / count


@torch.no_grad()
def predict(model, images: Tensor, out_size, *, mode: str, num_classes: int, crop: int = 512,
            stride: int = 341) -> Tensor:
    """Label map ``[B, H_out, W_out]`` (int64): logits by ``mode`` (``whole`` | ``slide``), resized to ``out_size``."""
    if mode == "slide":
        logits = slide_logits(model, images, num_classes, crop, stride)
    elif mode == "whole":
        logits = _logits(model, images)
    else:
        raise ValueError(f"inference mode must be whole|slide, got {mode!r}")
    logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.argmax(1)


@torch.no_grad()
def evaluate(model, loader, device: torch.device, num_classes: int, *, mode: str, crop: int, stride: int,
             amp_dtype: torch.dtype | None = None,
             on_pred: Callable[[int, Tensor], None] | None = None) -> dict:
    """Score ``model`` on ``loader`` (batches of one ``(image, label, index)``; each rank its own share).

    ``on_pred(index, pred)`` receives every prediction (``[H, W]`` int64, on the device), e.g. to write it.
    Returns :func:`scores` plus ``images`` (over all ranks) and ``confusion`` (the summed matrix as lists).
    """
    from torchmetrics.aggregation import SumMetric
    from torchmetrics.classification import MulticlassConfusionMatrix

    was_training = model.training
    model.eval()
    cm = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE, validate_args=False).to(device)
    n = SumMetric(nan_strategy="disable").to(device)  # images
    for images, labels, idx in loader:
        images = images.to(device, non_blocking=True)  # uint8 [1, 3, h, w]
        labels = labels.to(device, non_blocking=True)  # uint8 [1, H, W]
        with autocast(device, amp_dtype):
            pred = predict(model, images, labels.shape[-2:], mode=mode, num_classes=num_classes, crop=crop,
                           stride=stride)
        cm.update(pred.reshape(-1), labels.reshape(-1).long())
        n.update(torch.full((), images.shape[0], dtype=torch.float32, device=device))
        if on_pred is not None:
            for i in range(pred.shape[0]):
                on_pred(int(idx[i]), pred[i])
    model.train(was_training)
    total = cm.compute()  # summed over ranks (a collective under DDP)
    return {**scores(total), "images": int(n.compute()), "confusion": total.cpu().tolist()}


def baseline_scores(cm: Tensor) -> dict[str, float]:
    """mIoU (percent) of two predictors that never look at the image, on the ground truth of the confusion matrix
    ``cm`` (rows: ground truth; only its row sums are read): ``mIoU_majority``, the most frequent ground-truth class
    on every pixel, and ``mIoU_chance``, a uniformly random class per pixel (its expected confusion matrix: ``n_t / K``
    in every column of row t). Both are scored by :func:`scores`, as the model is."""
    gt = cm.double().cpu().sum(1)  # [K] labelled pixels per class
    k = gt.numel()
    majority = torch.zeros(k, k, dtype=torch.float64)
    majority[:, int(gt.argmax())] = gt
    chance = gt.unsqueeze(1).expand(k, k) / k  # [K, K]
    return {"mIoU_majority": scores(majority)["mIoU"], "mIoU_chance": scores(chance)["mIoU"]}


def colour_labels(labels: Tensor, num_labels: int) -> Tensor:
    """``uint8 [3, H, W]``: label ``v`` of ``labels [H, W]`` in colour ``v`` of torchvision's mask palette (0, the
    ignore / unlabelled value in ADE20K's convention, black); values ``>= num_labels`` stay black."""
    from torchvision.utils import draw_segmentation_masks

    masks = labels[None] == torch.arange(num_labels, device=labels.device)[:, None, None]  # [V, H, W]
    canvas = torch.zeros(3, *labels.shape, dtype=torch.uint8, device=labels.device)
    return draw_segmentation_masks(canvas, masks, alpha=1.0)


def render(rows: list[tuple[Tensor, Tensor, Tensor]], num_labels: int, gap: int = 4) -> Tensor:
    """A ``uint8 [3, H, W]`` grid with one row per ``(image uint8 [3, h, w], ground truth [h, w], prediction
    [h, w])`` (label maps in ADE20K's convention): image | ground truth | prediction, tiles padded to the largest."""
    from torchvision.utils import make_grid

    tiles = [t for img, gt, pred in rows for t in (img, colour_labels(gt, num_labels), colour_labels(pred, num_labels))]
    h, w = max(t.shape[-2] for t in tiles), max(t.shape[-1] for t in tiles)
    tiles = [F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=255) for t in tiles]
    return make_grid(tiles, nrow=3, padding=gap, pad_value=255)


__all__ = ["baseline_scores", "colour_labels", "confusion_matrix", "evaluate", "predict", "render", "scores",
           "slide_logits"]

"""COCO training and evaluation transforms (method §9.2), torchvision.transforms.v2 on ``(image, target)`` pairs of
:func:`localmim.data.dense.coco.coco_dataset`: category ids -> contiguous labels, flip, large-scale jitter (LSJ) or
the detector's own multi-scale resize, boxes recomputed from the masks after a crop."""

from __future__ import annotations

from typing import Any

import torch

from localmim.data.dense.coco import CocoSplit


class _Prepare:
    """Image -> tv_tensors.Image; an image without annotations gets empty ``boxes/masks/labels`` (the wrapper
    returns only ``image_id`` then); category ids -> contiguous labels ``1..K``."""

    def __init__(self, label_of_cat: dict[int, int]):
        self.label_of_cat = label_of_cat

    def __call__(self, image, target: dict) -> tuple[Any, dict]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        image = F.to_image(image)  # uint8 [3, H, W]
        h, w = image.shape[-2:]
        if "boxes" not in target:
            target = {"image_id": target["image_id"],
                      "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                      "masks": tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8)),
                      "labels": torch.zeros(0, dtype=torch.int64)}
        else:
            labels = [self.label_of_cat[int(c)] for c in target["labels"].tolist()]
            target = {**target, "labels": torch.tensor(labels, dtype=torch.int64)}
        return image, target


class _BoxesFromMasks:
    """Recompute every box as its mask's extent (after a crop, the clamped polygon box and the visible mask
    differ; ViTDet's LSJ recomputes them too). Empty masks get an empty box, removed by SanitizeBoundingBoxes."""

    def __call__(self, image, target: dict) -> tuple[Any, dict]:
        from torchvision import tv_tensors
        from torchvision.ops import masks_to_boxes

        masks = target["masks"].as_subclass(torch.Tensor)  # [N, H, W]
        boxes = torch.zeros(masks.shape[0], 4)
        keep = masks.flatten(1).any(1).bool()  # [N]
        if keep.any():
            boxes[keep] = masks_to_boxes(masks[keep]).float()
            boxes[keep, 2:] += 1  # inclusive last pixel -> box edge
        target = {**target, "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=masks.shape[-2:])}
        return image, target


def train_transforms(split: CocoSplit, augment: str, image_size: int, scale_range: tuple[float, float]):
    """Training augmentation (method §9.2), a ``(image, target)`` callable.

    ``lsj``: flip, large-scale jitter (resize to ``image_size * r``, r in ``scale_range``, keeping the aspect),
    crop / pad to ``image_size`` square, boxes recomputed from the masks, empty instances dropped.
    ``multiscale``: flip only; the detector's own transform picks the random short side (Mask R-CNN FPN 3x).
    """
    from torchvision.transforms import v2

    steps: list[Any] = [_Prepare({c: lab for lab, c in split.label_to_cat.items()}), v2.RandomHorizontalFlip()]
    if augment == "lsj":
        steps += [v2.ScaleJitter((image_size, image_size), scale_range=tuple(scale_range)),
                  v2.RandomCrop(image_size, pad_if_needed=True), _BoxesFromMasks(),
                  v2.SanitizeBoundingBoxes(min_size=1)]
    elif augment != "multiscale":
        raise ValueError(f"augment must be lsj|multiscale, got {augment!r}")
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def eval_transforms(split: CocoSplit):
    """Evaluation: the image at its original size (the detector resizes it and maps results back)."""
    from torchvision.transforms import v2

    return v2.Compose([_Prepare({c: lab for lab, c in split.label_to_cat.items()}),
                       v2.ToDtype(torch.float32, scale=True)])

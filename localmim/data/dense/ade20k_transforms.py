"""ADE20K training augmentation (method §9.1), torchvision.transforms.v2 on ``(tv_tensors.Image uint8,
tv_tensors.Mask uint8)`` so the geometric ops use nearest interpolation on the mask: random rescale of the base scale
by a ratio in ``ratio_range``, random crop whose largest class covers at most ``cat_max_ratio`` of the labelled
pixels (10 tries), horizontal flip, photometric distortion, padding to the crop size (image: the mean colour, mask
:data:`IGNORE`). Normalisation happens on the device.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IGNORE = 255  # the ignored label of the reduced label maps (reduce-zero-label, method §9.1)


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio rescale into ``scale = (long, short)`` (MMSeg ``Resize(keep_ratio=True)``): the factor is
    ``min(long / max(h, w), short / min(h, w))``."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


class RandomRescale(v2.Transform):
    """Rescale to ``scale × r`` (keep ratio), ``r ~ U(ratio_range)``; nearest interpolation for masks."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float]):
        super().__init__()
        self.scale, self.ratio_range = scale, ratio_range

    def make_params(self, flat_inputs: list) -> dict:
        h, w = _mask_of(flat_inputs).shape[-2:]
        r = float(torch.empty(1).uniform_(*self.ratio_range))
        return {"size": list(rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r))))}

    def transform(self, inpt, params: dict):
        return F.resize(inpt, params["size"], antialias=True)


class CatMaxRatioCrop(v2.Transform):
    """Random ``size`` crop (smaller where the image is); up to 10 draws until no class covers more than
    ``cat_max_ratio`` of the crop's labelled pixels (and at least two classes are present), MMSeg's rule."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, tries: int = 10):
        super().__init__()
        self.size, self.cat_max_ratio, self.tries = size, cat_max_ratio, tries

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.size, h), min(self.size, w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return top, left, ch, cw

    def make_params(self, flat_inputs: list) -> dict:
        mask = _mask_of(flat_inputs)
        h, w = mask.shape[-2:]
        box = self._draw(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.tries):
                t, le, ch, cw = box
                crop = mask[..., t:t + ch, le:le + cw]
                counts = torch.bincount(crop[crop != IGNORE].flatten().long())
                counts = counts[counts > 0]
                if counts.numel() > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._draw(h, w)
        return dict(zip(("top", "left", "height", "width"), box, strict=True))

    def transform(self, inpt, params: dict):
        return F.crop(inpt, **params)


PAD_RGB = (124, 116, 104)  # the ImageNet mean: 0 after normalisation, like MMSeg's padding of normalised images


class PadTo(v2.Transform):
    """Pad bottom/right to ``size × size``: images with the mean colour (:data:`PAD_RGB`), masks with the ignore
    label."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list) -> dict:
        h, w = _mask_of(flat_inputs).shape[-2:]
        return {"padding": [0, 0, max(0, self.size - w), max(0, self.size - h)]}

    def transform(self, inpt, params: dict):
        fill = IGNORE if isinstance(inpt, tv_tensors.Mask) else list(PAD_RGB)
        return F.pad(inpt, params["padding"], fill=fill)


def _mask_of(flat_inputs: list) -> torch.Tensor:
    for x in flat_inputs:
        if isinstance(x, tv_tensors.Mask):
            return x
    raise TypeError("segmentation transforms need a tv_tensors.Mask among the inputs")


def train_transform(crop_size: int, scale: tuple[int, int], ratio_range: tuple[float, float],
                    cat_max_ratio: float, photometric: bool = True) -> v2.Compose:
    """Method §9.1 training augmentation on ``(Image uint8, Mask uint8)``; normalisation happens on the device.

    Photometric distortion is torchvision's ``ColorJitter`` (brightness factor 0.875-1.125, contrast/saturation
    0.5-1.5, hue ±18/360, all four in random order on every image), not MMSeg's per-op coin flips with additive
    brightness ±32 (method §17, row 22).
    """
    return v2.Compose([
        RandomRescale(scale, ratio_range),
        CatMaxRatioCrop(crop_size, cat_max_ratio),
        v2.RandomHorizontalFlip(0.5),
        *([v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=18 / 360)] if photometric else []),
        PadTo(crop_size),
    ])

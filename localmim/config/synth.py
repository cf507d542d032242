"""Params of the ``synth`` stage: the embedded mini datasets (ImageNet, ADE20K and COCO on-disk layouts)."""

from typing import Annotated

from pydantic import Field, model_validator

from localmim.config import register_section
from localmim.config.base import PosInt, Section


@register_section("synth")
class SynthConfig(Section):
    seed: int = 0
    # ImageNet layout: class decidable from image content (shape kind), random pose/colour/texture/background.
    num_classes: Annotated[int, Field(ge=2, le=20)] = 10
    train_per_class: PosInt = 60
    val_per_class: PosInt = 20
    min_side: Annotated[int, Field(ge=16)] = 48  # ImageNet image sides
    max_side: Annotated[int, Field(ge=16)] = 160
    # ADE20K layout (semantic segmentation) and COCO layout (instances).
    # ADE20K and COCO both use the first ``seg_classes`` shape kinds (20 kinds exist, see localmim.synth).
    seg_classes: Annotated[int, Field(ge=1, le=20)] = 8
    seg_train: PosInt = 40
    seg_val: PosInt = 16
    coco_train: PosInt = 40
    coco_val: PosInt = 16
    dense_min_side: Annotated[int, Field(ge=16)] = 48  # ADE20K and COCO image sides
    dense_max_side: Annotated[int, Field(ge=16)] = 160
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 90

    @model_validator(mode="after")
    def _sides(self):
        for lo, hi in (("min_side", "max_side"), ("dense_min_side", "dense_max_side")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) must be <= {hi} ({getattr(self, hi)})")
        return self

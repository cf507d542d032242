"""Params of the ``targets`` stage: K fixed augmented views per image with their multi-scale targets."""

from typing import Annotated, Literal

from pydantic import Field

from localmim.config import register_section
from localmim.config.base import Section


@register_section("targets")
class TargetsConfig(Section):
    views: Annotated[int, Field(ge=1)] = 4  # K; pretraining epoch e reads view e mod K
    seed: Annotated[int, Field(ge=0)] = 0  # view k of image `key` is drawn from (seed, k, key)
    model: str = "localmim_vit_tiny_patch8"  # gives the target kind and cell sizes; must match pretrain.model
    input_size: Annotated[int, Field(ge=1)] = 64  # must match pretrain.input_size
    hog_nbins: Annotated[int, Field(ge=1)] | None = None  # null = the model's default; must match pretrain
    dtype: Literal["fp16", "fp32"] = "fp16"  # storage of the un-normalised finest-cell histograms
    max_samples_per_shard: Annotated[int, Field(ge=1)] = 1000
    workers: Annotated[int, Field(ge=1)] = 2  # processes computing views

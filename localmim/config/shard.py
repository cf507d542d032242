"""Params of the ``shard`` stage: ImageFolder -> WebDataset tar shards."""

from typing import Annotated, Literal

from pydantic import Field

from localmim.config import register_section
from localmim.config.base import Section


@register_section("shard")
class ShardConfig(Section):
    # shards are the unit of reader parallelism: keep their count a multiple of (DataLoader workers x ranks)
    max_samples_per_shard: Annotated[int, Field(ge=1)] = 100
    max_shard_bytes: Annotated[int, Field(ge=1024)] = 1 << 30  # 1 GiB, WebDataset's usual upper size
    max_side: Annotated[int, Field(ge=0)] = 0  # 0 = keep originals; >0 = downscale the long side (recorded)
    seed: int = 0  # deterministic shuffle of samples across shards
    workers: Annotated[int, Field(ge=1)] = 2
    on_bad: Literal["skip", "fail"] = "skip"
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 95  # for re-encoded (non-JPEG / non-RGB) inputs
    max_pixels: Annotated[int, Field(ge=1)] = 89_478_485  # decompression-bomb limit on width*height (PIL's default)

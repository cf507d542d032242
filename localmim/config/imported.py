"""Params of ``localmim import``: a released pre-training checkpoint turned into the encoder export of ``pretrain``.

In the DAG (``import_encoder`` node, :mod:`localmim.pipeline.dag`) a set ``source`` starts the pipeline from that
checkpoint instead of pre-training; ``null`` keeps pre-training. The checkpoint lies outside the DAG, so its bytes are
pinned by ``sha256`` (checked; a changed hash reruns the node and everything downstream).
"""

from typing import Annotated, Literal

from pydantic import Field

from localmim.config import register_section
from localmim.config.base import Section


@register_section("imported")
class ImportConfig(Section):
    source: str | None = None  # checkpoint file; null = nothing imported (the DAG pre-trains)
    format: Literal["auto", "localmim-vit", "localmim-swin", "mae"] = "auto"  # `--from`; checked against the keys
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None  # expected sha256 of source; null = any
    model: str | None = None  # target architecture, a registry name (pretrain.model vocabulary); null = inferred
    img_size: Annotated[int, Field(ge=0)] = 0  # target input size; 0 = the source's (ViT pos_embed resampled)
    num_heads: Annotated[int, Field(ge=1)] | None = None  # ViT heads when inferred (null: the width's usual heads)
    final_norm: Literal["fresh", "tap"] = "fresh"  # fresh: method §8.2; tap: last tap LayerNorm -> timm norm

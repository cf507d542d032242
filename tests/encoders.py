"""The untrained micro encoders the dense-task tests build on (seeded): as an ``EncoderSpec`` or exported."""

from __future__ import annotations

from pathlib import Path

import torch

from localmim.models import create
from localmim.models.encoder_io import EncoderSpec, write_encoder

# family -> (registry name, overrides): a 4-block ViT at 32 px (patch 8) and a nano Swin at 64 px (patch 2)
MICRO = {"vit": ("localmim_vit_micro_patch8", {"img_size": 32}), "swin": ("localmim_swin_nano_p2_64", {})}


def micro_model(family: str = "vit", seed: int = 0) -> torch.nn.Module:
    """The LocalMIM pre-training model of ``family``, initialised from ``seed``."""
    name, kwargs = MICRO[family]
    torch.manual_seed(seed)
    return create(name, **kwargs)


def micro_spec(family: str = "vit", seed: int = 0) -> EncoderSpec:
    """Its exported encoder (timm name, kwargs, weights), as ``read_encoder`` would return it."""
    from localmim.models.export import export_encoder
    from localmim.models.swin import export_swin_encoder

    export = export_swin_encoder if family == "swin" else export_encoder
    return EncoderSpec(*export(micro_model(family, seed).eval()))


def micro_encoder(out: Path, family: str = "vit", seed: int = 0) -> Path:
    """Its exported encoder directory (``encoder.pt`` + ``encoder.json``)."""
    write_encoder(micro_model(family, seed), out, {})
    return out

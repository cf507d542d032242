"""Params of the ``linprobe`` stage: frozen encoder, BatchNorm1d (no affine) + linear head (MAE protocol).

Features are extracted once (eval transform) and cached, then the head is trained on them: a cheap signal
for comparing pre-training runs. MAE trains its probe with LARS (blr 0.1, batch 16384, 90 epochs, no weight
decay); ``optimizer: lars`` uses timm's LARS with those semantics, ``sgd``/``adamw`` are offered as simpler options.
"""

from typing import Literal

from localmim.config import register_section
from localmim.config.base import Amp, Betas, Device, GlobalBatch, NonNeg, NonNegInt, PosFloat, PosInt, Section


@register_section("linprobe")
class LinprobeConfig(GlobalBatch, Section):
    model: str = "auto"  # timm model name; "auto" = the one recorded with the exported encoder
    epochs: PosInt = 90
    warmup_epochs: NonNeg = 10
    global_batch: PosInt = 256  # the recipe: features per optimizer step (MAE: 16384)
    batch_size: PosInt = 256  # per step on the cached features: accumulation = global_batch / batch_size
    lr: PosFloat | None = None  # absolute lr; null = blr * global_batch / 256 (single process)
    blr: PosFloat | None = 0.1
    min_lr: NonNeg = 0.0
    weight_decay: NonNeg = 0.0
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    betas: Betas = (0.9, 0.999)  # optimizer: adamw only (torch's defaults)
    input_size: NonNegInt = 0  # 0 = the encoder's pre-training resolution
    num_workers: NonNegInt = 2
    seed: int = 0
    device: Device = "auto"
    amp: Amp = "auto"  # feature extraction only: CUDA auto: bf16 where supported, else fp16

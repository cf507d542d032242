"""Params of the ``linprobe`` stage: frozen encoder, BatchNorm1d (no affine) + linear head (MAE protocol).

Features are extracted once (eval transform) and cached, then the head is trained on them: a cheap signal
for comparing pre-training runs. MAE trains its probe with LARS (blr 0.1, batch 16384, 90 epochs, no weight
decay); ``optimizer: lars`` uses timm's LARS with those semantics, ``sgd``/``adamw`` are offered as simpler options.
"""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from localmim.config import register_section
from localmim.config.base import Section

PosInt = Annotated[int, Field(ge=1)]
NonNeg = Annotated[float, Field(ge=0)]


@register_section("linprobe")
class LinprobeConfig(Section):
    model: str = "auto"  # timm model name; "auto" = the one recorded with the exported encoder
    epochs: PosInt = 90
    warmup_epochs: NonNeg = 10
    batch_size: PosInt = 256
    accum_iter: PosInt = 1
    lr: Annotated[float, Field(gt=0)] | None = None  # absolute lr; null = blr * eff_batch / 256
    blr: Annotated[float, Field(gt=0)] | None = 0.1
    min_lr: NonNeg = 0.0
    weight_decay: NonNeg = 0.0
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    input_size: Annotated[int, Field(ge=0)] = 0  # 0 = the encoder's pre-training resolution
    num_workers: Annotated[int, Field(ge=0)] = 2
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # CUDA auto: bf16 where supported, else fp16 + GradScaler

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        if self.lr is None and self.blr is None:
            raise ValueError("set lr (absolute) or blr (lr = blr * effective batch / 256)")
        return self

    def peak_lr(self) -> float:
        """Absolute peak lr: ``lr`` if set, else ``blr × batch_size × accum_iter / 256`` (single process)."""
        return self.lr if self.lr is not None else self.blr * self.batch_size * self.accum_iter / 256

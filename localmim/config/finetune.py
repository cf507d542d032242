"""Params of the ``finetune`` stage: timm classifier from the pre-trained encoder, method §8 recipe.

Embedded defaults are sized for the mini ImageNet on 2 CPU cores (about a minute); the paper's ViT-B
values are in method §8 (epochs 100, warm-up 20, lr 2e-3 absolute, batch 1024, layer decay 0.65).
"""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from localmim.config import register_section
from localmim.config.base import Section

PosInt = Annotated[int, Field(ge=1)]
NonNeg = Annotated[float, Field(ge=0)]
Prob = Annotated[float, Field(ge=0, le=1)]


@register_section("finetune")
class FinetuneConfig(Section):
    model: str = "auto"  # timm model name; "auto" = the one recorded with the exported encoder
    epochs: PosInt = 10
    warmup_epochs: NonNeg = 2
    batch_size: PosInt = 32  # per device
    accum_iter: PosInt = 1
    lr: Annotated[float, Field(gt=0)] | None = 2e-3  # absolute peak lr (method §8: not rescaled by batch size)
    blr: Annotated[float, Field(gt=0)] | None = None  # used only when lr is null: lr = blr * eff_batch / 256
    min_lr: NonNeg = 1e-5
    weight_decay: NonNeg = 0.05
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 0.75
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.1
    mixup: NonNeg = 0.8
    cutmix: NonNeg = 1.0
    mixup_prob: Prob = 1.0
    mixup_switch_prob: Prob = 0.5
    smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    reprob: Prob = 0.25
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: PosInt = 1
    aa: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; null = no auto-augment
    input_size: Annotated[int, Field(ge=0)] = 0  # 0 = the encoder's pre-training resolution
    num_workers: Annotated[int, Field(ge=0)] = 2
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # CUDA auto: bf16 where supported, else fp16 + GradScaler
    ckpt_every: PosInt = 1  # epochs between resumable checkpoints
    nproc_per_node: PosInt = 1  # torchrun processes (DVC/Snakemake launcher)

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        if self.lr is None and self.blr is None:
            raise ValueError("set lr (absolute) or blr (lr = blr * effective batch / 256)")
        if self.min_lr > (self.lr if self.lr is not None else float("inf")):
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0 and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair samples within a batch: batch_size={self.batch_size} must be even")
        return self

    def peak_lr(self, world_size: int) -> float:
        """Absolute peak lr: ``lr`` if set, else ``blr × batch_size × accum_iter × world_size / 256``."""
        if self.lr is not None:
            return self.lr
        return self.blr * self.batch_size * self.accum_iter * world_size / 256

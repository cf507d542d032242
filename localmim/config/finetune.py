"""Params of the ``finetune`` stage: timm classifier from the pre-trained encoder, method §8 recipe.

Embedded defaults are sized for the mini ImageNet on 2 CPU cores (about a minute); the paper's ViT-B
values are in method §8 (epochs 100, warm-up 20, lr 2e-3 absolute, batch 1024, layer decay 0.65).
"""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from localmim.config import register_section
from localmim.config.base import Amp, Betas, Device, GlobalBatch, NonNeg, NonNegInt, PosFloat, PosInt, Prob, Section


@register_section("finetune")
class FinetuneConfig(GlobalBatch, Section):
    # batch_size and nproc_per_node only set the accumulation (global_batch is the recipe): a run resumes under others
    runtime_keys = frozenset({"num_workers", "device", "ckpt_every", "ckpt_minutes", "log_every", "compile",
                              "nproc_per_node", "batch_size", "grad_checkpointing"})
    model: str = "auto"  # timm model name; "auto" = the one recorded with the exported encoder
    epochs: PosInt = 10
    warmup_epochs: NonNeg = 2
    global_batch: PosInt = 32  # the recipe: images per optimizer step over all devices (method §8: 1024)
    batch_size: PosInt = 32  # per device, a memory knob: accumulation = global_batch / (batch_size x world size)
    lr: PosFloat | None = 2e-3  # absolute peak lr (method §8: not rescaled by batch size)
    blr: PosFloat | None = None  # used only when lr is null: lr = blr * global_batch / 256
    min_lr: NonNeg = 1e-5
    weight_decay: NonNeg = 0.05
    betas: Betas = (0.9, 0.999)  # AdamW, method §8
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
    input_size: NonNegInt = 0  # 0 = the encoder's pre-training resolution
    num_workers: NonNegInt = 2
    seed: int = 0
    device: Device = "auto"
    amp: Amp = "auto"  # CUDA auto: bf16 where supported, else fp16 + GradScaler
    grad_checkpointing: bool = False  # recompute the blocks in the backward: less memory, same gradients
    ckpt_every: PosInt = 1  # epochs between resumable checkpoints
    ckpt_minutes: NonNeg = 30  # also checkpoint mid-epoch this often (0 = never)
    log_every: PosInt = 50  # optimizer steps between loss reads (a host sync) and MLflow points (and every epoch end)
    compile: bool = False  # torch.compile the classifier
    nproc_per_node: PosInt = 1  # torchrun processes (DVC/Snakemake launcher)

    @model_validator(mode="after")
    def _check(self):
        if (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0 and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix pair samples within a batch: batch_size={self.batch_size} must be even")
        return self

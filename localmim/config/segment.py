"""Params of the ``segment`` stage: UperNet on the exported encoder, ADE20K, method §9.1.

Embedded defaults fit the mini ADE20K of ``localmim synth`` on 2 CPU cores (well under a minute); the method §9.1
recipes (512 crop, 160k iterations, global batch 16) are in ``configs/ade20k_vit_base.yaml`` /
``ade20k_swin_base.yaml``. The recipe is the global batch (:class:`~localmim.config.base.GlobalBatch`); ``lr`` is
absolute, as in MMSegmentation's recipes.
"""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from localmim.config import register_section
from localmim.config.base import Amp, Betas, Device, GlobalBatch, NonNeg, NonNegInt, PosFloat, PosInt, Section


@register_section("segment")
class SegmentConfig(GlobalBatch, Section):
    # batch_size and nproc_per_node only set the accumulation (global_batch is the recipe): a run resumes under others
    runtime_keys = frozenset({"num_workers", "device", "ckpt_minutes", "log_every", "ckpt_every", "eval_every",
                              "num_vis", "nproc_per_node", "on_bad", "inference", "slide_stride", "test_scale",
                              "grad_checkpointing", "batch_size"})
    num_classes: Annotated[int, Field(ge=1, le=254)] = 150  # ADE20K: 150; the embedded data: synth.seg_classes
    # data pipeline (method §9.1): keep-ratio rescale of scale=(long, short) by r ~ U(ratio_range), crop, flip
    crop_size: PosInt = 512
    scale: tuple[PosInt, PosInt] = (2048, 512)
    ratio_range: tuple[PosFloat, PosFloat] = (0.5, 2.0)
    cat_max_ratio: Annotated[float, Field(gt=0, le=1)] = 0.75  # 1.0 = plain random crop
    test_scale: tuple[PosInt, PosInt] = (2048, 512)
    on_bad: Literal["skip", "fail"] = "skip"
    # model
    channels: PosInt = 768  # UPerHead width (ViT-B 768, Swin-B 512)
    aux_channels: NonNegInt = 256  # 0 = no auxiliary head
    aux_weight: NonNeg = 0.4
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.1
    pretrained: bool = True  # false: the same encoder architecture randomly initialised (a baseline)
    # optimisation: AdamW, layer-wise lr decay (1.0 = none), poly schedule with linear warm-up, per iteration
    iters: PosInt = 160000
    global_batch: PosInt = 16  # the recipe: crops per optimizer step over all devices (method §9.1: 8 GPUs x 2)
    batch_size: PosInt = 2  # per device, a memory knob: accumulation = global_batch / (batch_size x world size)
    lr: PosFloat = 4e-4
    min_lr: NonNeg = 0.0
    power: PosFloat = 1.0
    warmup_iters: NonNegInt = 1500
    warmup_ratio: Annotated[float, Field(gt=0, le=1)] = 1e-6
    weight_decay: NonNeg = 0.05
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 0.65
    betas: Betas = (0.9, 0.999)  # AdamW (MMSeg's BEiT/MAE recipe)
    # evaluation: auto = slide for ViT, whole for Swin (method §9.1)
    inference: Literal["auto", "slide", "whole"] = "auto"
    slide_stride: PosInt = 341
    eval_every: NonNegInt = 16000  # 0 = only at the end
    num_vis: NonNegInt = 4  # val images in the image | ground truth | prediction grid
    # runtime
    num_workers: NonNegInt = 2
    seed: int = 0
    device: Device = "auto"
    amp: Amp = "auto"
    grad_checkpointing: bool = False  # recompute the blocks in the backward: less memory, same gradients
    ckpt_every: PosInt = 2000  # iterations between resumable checkpoints
    ckpt_minutes: NonNeg = 30  # also checkpoint mid-run this often (0 = never)
    log_every: PosInt = 50
    nproc_per_node: PosInt = 1  # torchrun processes (DVC/Snakemake launcher)

    @model_validator(mode="after")
    def _check(self):
        if self.ratio_range[0] > self.ratio_range[1]:
            raise ValueError(f"ratio_range={list(self.ratio_range)} must be (low, high) with low <= high")
        if self.slide_stride > self.crop_size:
            raise ValueError(f"slide_stride={self.slide_stride} exceeds crop_size={self.crop_size} (gaps)")
        return self

"""Params of the ``detect`` stage: Mask R-CNN on the exported encoder, COCO box and mask AP (method §9.2).

Embedded defaults fit the mini COCO on 2 CPU cores (2-3 minutes): 64 px multi-scale, 100 iterations at lr 1e-3,
8-px anchors, narrow heads (method §17 rows 31 and 35: why not LSJ, lr 1e-4 and 20 iterations).
Published recipes: ``configs/coco_vit_base.yaml`` (ViTDet, 1024 px LSJ, 100 epochs) and
``configs/coco_swin_base.yaml`` (Mask R-CNN FPN 3x, multi-scale). The recipe is the global batch
(:class:`~localmim.config.base.GlobalBatch`); ``lr`` is absolute, as in ViTDet's and Swin's recipes.
"""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from localmim.config import register_section
from localmim.config.base import Amp, Betas, Device, Frac, GlobalBatch, NonNeg, NonNegInt, PosFloat, PosInt, Section


@register_section("detect")
class DetectConfig(GlobalBatch, Section):
    # eval_every stays in the run's identity: an evaluation's loader draws from the global RNG (so the training stream);
    # batch_size and nproc_per_node only set the accumulation (global_batch is the recipe): a run resumes under others
    runtime_keys = frozenset({"num_workers", "device", "ckpt_minutes", "ckpt_every", "log_every", "vis_images",
                              "nproc_per_node", "on_bad", "grad_checkpointing", "batch_size"})
    pretrained: bool = True  # false: the same encoder architecture randomly initialised (baseline)
    image_size: Annotated[int, Field(ge=32)] = 64  # LSJ crop / test short side (long side for LSJ)
    augment: Literal["lsj", "multiscale"] = "lsj"
    scale_range: tuple[PosFloat, PosFloat] = (0.1, 2.0)  # LSJ
    train_scales: list[Annotated[int, Field(ge=32)]] = []  # multiscale: short sides, must contain image_size
    max_size: NonNegInt = 0  # long-side cap; 0 = image_size (LSJ's square input)
    epochs: PosInt = 2
    global_batch: PosInt = 4  # the recipe: images per optimizer step over all devices (ViTDet: 64)
    batch_size: PosInt = 4  # per device (training and evaluation); accumulation = global_batch / (batch_size x world)
    lr: PosFloat = 1e-4  # absolute peak lr
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[Frac] = [0.889, 0.963]  # step: fractions of all iterations where lr drops by x0.1 (ViTDet)
    min_lr: NonNeg = 0.0  # cosine floor
    warmup_iters: NonNegInt = 5  # linear warm-up from 0.001 x lr
    weight_decay: NonNeg = 0.1
    betas: Betas = (0.9, 0.999)  # AdamW (ViTDet)
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 0.7
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.1
    window_size: NonNegInt = 0  # ViT: ViTDet windowed attention (patches per side); 0 = all global
    global_blocks: list[NonNegInt] = []  # ViT blocks kept global (0-based); [] = ViTDet's
    anchor_size: NonNegInt = 0  # smallest anchor; 0 = 32 * image_size / 1024 (>= 4)
    rpn_batch_size_per_image: PosInt = 256
    box_batch_size_per_image: PosInt = 512
    box_head_dim: PosInt = 1024  # torchvision's two-MLP box head
    mask_head_channels: PosInt = 256  # torchvision's four-conv mask head
    detections_per_img: PosInt = 100
    eval_every: PosInt = 1  # epochs between COCO evaluations (and always at the end)
    on_bad: Literal["skip", "fail"] = "skip"
    vis_images: NonNegInt = 4  # val images drawn into val_predictions.png
    num_workers: NonNegInt = 2
    seed: int = 0
    device: Device = "auto"
    amp: Amp = "auto"
    grad_checkpointing: bool = False  # recompute the blocks in the backward: less memory, same gradients
    ckpt_every: PosInt = 1  # epochs between resumable checkpoints
    ckpt_minutes: NonNeg = 30  # also checkpoint mid-run this often (0 = never)
    log_every: PosInt = 10  # iterations between loss reads (a host sync) and MLflow points
    nproc_per_node: PosInt = 1  # torchrun processes (DVC/Snakemake launcher)

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.scale_range
        if lo > hi:
            raise ValueError(f"scale_range {list(self.scale_range)}: low end exceeds high end")
        if self.train_scales and self.image_size not in self.train_scales:
            raise ValueError(f"train_scales {self.train_scales} must contain image_size={self.image_size} "
                             "(the test scale)")
        if self.max_size and self.max_size < self.image_size:
            raise ValueError(f"max_size={self.max_size} is below image_size={self.image_size}")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"milestones {self.milestones} must be increasing")
        return self

"""Params of the ``pretrain`` stage: method §7 recipe with its vocabulary.

Embedded defaults are sized for the mini ImageNet on 2 CPU cores (~1-3 minutes); the paper's ViT-B recipe
(1600 epochs, warm-up 40, global batch 4096, blr 2e-4, min_lr 1e-6) is ``configs/imagenet_vit_base.yaml``.
"""

from typing import Literal

from localmim.config import register_section
from localmim.config.base import Amp, Betas, Device, Frac, GlobalBatch, NonNeg, NonNegInt, PosFloat, PosInt, Section


@register_section("pretrain")
class PretrainConfig(GlobalBatch, Section):
    # batch_size and nproc_per_node only set the accumulation (global_batch is the recipe): a run resumes under others
    runtime_keys = frozenset(
        {"num_workers", "pin_memory", "ckpt_every", "ckpt_minutes", "compile", "grad_checkpointing", "nproc_per_node",
         "nnodes", "log_every", "device", "fused_attn", "knn_every", "knn_train", "knn_val", "knn_k", "knn_temperature",
         "batch_size"})
    model: str = "localmim_vit_tiny_patch8"  # a localmim.models registry name (localmim_* or mae_* baseline)
    mode: Literal["auto", "localmim", "mae"] = "auto"  # auto = the model's own; else must match the model
    target: Literal["auto", "hog", "pixel"] = "auto"  # auto = the model's default target
    hog_nbins: PosInt | None = None  # null = the model's default (9, or 18 for ViT-L/Swin)
    hog_bias: bool | None = None  # null = the model's default
    norm_pix_loss: bool = True  # per-patch normalised pixel targets
    input_size: PosInt = 64  # S; must match the model's img_size (models are built for it)
    mask_ratio: Frac = 0.75
    epochs: PosInt = 3
    warmup_epochs: NonNeg = 1
    global_batch: PosInt = 32  # the recipe: images per optimizer step over all devices (method §7: 4096 for ViT-B)
    batch_size: PosInt = 32  # per device, a memory knob: accumulation = global_batch / (batch_size x world size)
    blr: PosFloat = 1.5e-4  # lr = blr * global_batch / 256
    lr: PosFloat | None = None  # absolute peak lr; overrides blr when set
    min_lr: NonNeg = 1e-6
    weight_decay: NonNeg = 0.05
    betas: Betas = (0.9, 0.95)  # AdamW, method §7
    seed: NonNegInt = 0  # rank r uses seed + r for the masking noise (method §7)
    data: Literal["online", "views"] = "online"
    shuffle_buffer: NonNegInt = 500  # samples per DataLoader worker; 0 = shard order only
    resampled: bool = False  # draw shards with replacement (multi-node); default: every sample once per epoch
    num_workers: NonNegInt = 2
    pin_memory: bool = True  # only used on CUDA
    ckpt_every: PosInt = 1  # epochs between resumable checkpoints
    ckpt_minutes: NonNeg = 30  # also checkpoint mid-epoch this often (0 = never)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute the blocks in the backward: less memory, same gradients
    # timm fused attention (F.scaled_dot_product_attention): auto = timm's default (fused where torch has it).
    # benchmarks/bench_pretrain.py measures on/off; on the shared 2-core CPU the difference was within run-to-run noise.
    fused_attn: Literal["auto", "on", "off"] = "auto"
    device: Device = "auto"
    nproc_per_node: PosInt = 1  # torchrun processes (DVC/Snakemake launcher)
    # nodes of the job (SLURM): the launcher starts itself once per node with srun, ranks meet by c10d rendezvous on
    # the first node; world size = nnodes x nproc_per_node (docs/reproducing.md, "Multi-node pre-training")
    nnodes: PosInt = 1
    amp: Amp = "auto"  # CUDA auto: bf16 where supported, else fp16 + GradScaler
    log_every: PosInt = 1  # steps between synced loss/throughput logs (the hot loop never syncs otherwise)
    # kNN monitor (rank 0, after every knn_every-th epoch and the last; 0 = off): weighted kNN top-1 of the top tap's
    # pooled features, bank = first knn_train train samples, queries = first knn_val val samples (fixed subsets)
    knn_every: NonNegInt = 0
    knn_train: PosInt = 1000
    knn_val: PosInt = 500
    knn_k: PosInt = 20
    knn_temperature: PosFloat = 0.07

    def model_overrides(self) -> dict:
        """Keyword overrides for ``localmim.models.create(self.model, ...)``."""
        kw: dict = {"img_size": self.input_size, "norm_pix_loss": self.norm_pix_loss}
        if self.target != "auto":
            kw["target"] = self.target
        if self.hog_nbins is not None:
            kw["hog_nbins"] = self.hog_nbins
        if self.hog_bias is not None:
            kw["hog_bias"] = self.hog_bias
        return kw

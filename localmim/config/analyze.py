"""Params of the ``analyze`` stage: per-layer probe/kNN, attention NMI and distance, reconstructions (method §10.2).

Embedded defaults take well under a minute on 2 CPU cores. On ImageNet, probe on a class-balanced subset
(e.g. ``probe_train: 50000`` = 50 per class, ``probe_val: 10000``) and keep ``attn_images`` in the hundreds.
"""

from typing import Annotated, Literal

from pydantic import Field

from localmim.config import register_section
from localmim.config.base import NonNegInt, Section


@register_section("analyze")
class AnalyzeConfig(Section):
    probe_train: NonNegInt = 10000  # labelled train images (probe training set / kNN bank); 0 = all
    probe_val: NonNegInt = 5000  # val images scored by every layer's probe and kNN; 0 = all
    attn_images: NonNegInt = 256  # val images for attention NMI / distance (un-masked, full encoder)
    recon_images: NonNegInt = 4  # val images drawn with every tap's reconstruction (0 = no reconstruction PNG)
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75  # masking of the reconstruction figure
    probe_steps: Annotated[int, Field(ge=1)] = 100  # L-BFGS iterations of each layer's logistic-regression probe
    probe_weight_decay: Annotated[float, Field(ge=0)] = 1e-3  # L2 penalty of the probe
    knn_k: Annotated[int, Field(ge=1)] = 20
    knn_temperature: Annotated[float, Field(gt=0)] = 0.07
    input_size: NonNegInt = 0  # 0 = the encoder's pre-training resolution
    batch_size: Annotated[int, Field(ge=1)] = 64
    num_workers: NonNegInt = 1
    seed: int = 0  # masking of the reconstruction figure
    device: Literal["auto", "cpu", "cuda"] = "auto"

"""UperNet on the exported encoder (method §9.1): multi-scale neck, UPerHead and the auxiliary FCN head.

- ViT neck: the tapped block outputs (stride p) become a 4-level pyramid: stride p/4 = two 2x2 transposed convs
  with BatchNorm + GELU between, p/2 = one transposed conv, p = identity, 2p = 2x2 average pooling
  (p = 16: strides 4, 8, 16, 32).
- Swin neck: a new LayerNorm on each of the four stage outputs.
- UPerHead (MMSeg's): pyramid pooling (scales 1, 2, 3, 6) on the coarsest level, 1x1 laterals, top-down
  addition, 3x3 FPN convs, all levels upsampled to the finest, concatenated, 3x3 fuse, dropout, 1x1 classifier.
- Auxiliary FCN head on the third level (stride 16): one 3x3 conv + BN + ReLU, dropout, 1x1 classifier.

Written with torch/timm layers rather than segmentation_models_pytorch 0.6's ``UPerNetDecoder``: that decoder
takes the input image as its first feature and derives the output size from it, has no 3x3 FPN convs after the
top-down path, and uses a 1x1 PSP bottleneck on ``in/4`` channels per branch, so it is not MMSeg's UPerHead of
method §9.1; it would also add a dependency for ~80 lines.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import ConvNormAct, LayerNorm2d
from torch import Tensor, nn

from localmim.models.backbone import EncoderFeatures
from localmim.models.encoder_io import EncoderSpec, ModelSpec

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def _resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ViTMultiScaleNeck(nn.Module):
    """Four same-stride ViT maps ``[B, D, h, w]`` -> ``[B, D, 4h, 4w]``, ``[B, D, 2h, 2w]``, ``[B, D, h, w]``,
    ``[B, D, h/2, w/2]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.AvgPool2d(2, 2)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class SwinNeck(nn.Module):
    """A new LayerNorm (over channels) on each Swin stage output."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [n(f) for n, f in zip(self.norms, feats, strict=True)]


class PyramidPooling(nn.Module):
    """PSP module: the input plus its pooled-to-``s×s`` 1x1 projections, upsampled, concatenated, 3x3 fused."""

    def __init__(self, in_ch: int, channels: int, scales=(1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_ch, channels, 1))
                                      for s in scales)
        self.bottleneck = ConvNormAct(in_ch + len(scales) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        outs = [x] + [_resize(b(x), x.shape[-2:]) for b in self.branches]
        return self.bottleneck(torch.cat(outs, 1))


class UPerHead(nn.Module):
    """UPerNet decode head (see the module docstring): levels ``[B, C_i, H_i, W_i]`` -> logits at level 0's size."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        self.psp = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        lat = [lc(f) for lc, f in zip(self.laterals, feats[:-1], strict=True)] + [self.psp(feats[-1])]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1], strict=True)] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))  # [B, C, H_0, W_0]
        return self.cls(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: ``num_convs`` 3x3 ConvBNReLU, dropout, 1x1 classifier (no input concatenation)."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        layers = [ConvNormAct(in_ch if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.dropout(self.convs(x)))


class Segmenter(nn.Module):
    """Backbone + neck + UPerHead (+ auxiliary FCN head on level ``aux_level``).

    ``forward(images)`` takes ``[B, 3, H, W]`` on the 0-255 scale (uint8 or float), normalises with the ImageNet
    mean/std, pads bottom/right to a multiple of ``size_divisor`` (every level then has an integer size) and
    returns logits ``[B, K, H, W]`` (bilinear from stride 4, padding cropped) and, in training, the auxiliary
    logits at the same size.
    """

    def __init__(self, backbone: EncoderFeatures, num_classes: int, channels: int, aux_channels: int = 256,
                 aux_level: int = 2):
        super().__init__()
        self.backbone = backbone
        # drop what the taps never reach (final norm, head, blocks after the last tap): DDP needs every
        # parameter to get a gradient
        backbone.encoder.prune_intermediate_layers(backbone.indices, prune_norm=True, prune_head=True)
        if backbone.swin:
            self.neck = SwinNeck(backbone.out_channels)
            levels = list(backbone.out_channels)
            self.size_divisor = backbone.strides[-1]
        else:
            self.neck = ViTMultiScaleNeck(backbone.out_channels[0])
            levels = [backbone.out_channels[0]] * 4
            self.size_divisor = 2 * backbone.strides[0]
        self.decode_head = UPerHead(levels, channels, num_classes)
        self.aux_head = FCNHead(levels[aux_level], aux_channels, num_classes) if aux_channels > 0 else None
        self.aux_level, self.num_classes = aux_level, num_classes
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1), persistent=False)

    def levels(self, images: Tensor) -> list[Tensor]:
        """Normalised, padded input -> the four pyramid levels."""
        x = (images.float() - self.mean) / self.std  # [B, 3, H, W]
        h, w = x.shape[-2:]
        d = self.size_divisor
        x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        return self.neck(self.backbone(x))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        h, w = images.shape[-2:]
        feats = self.levels(images)
        hp, wp = -(-h // self.size_divisor) * self.size_divisor, -(-w // self.size_divisor) * self.size_divisor
        logits = _resize(self.decode_head(feats), (hp, wp))[..., :h, :w]  # [B, K, H, W]
        aux = None
        if self.training and self.aux_head is not None:
            aux = _resize(self.aux_head(feats[self.aux_level]), (hp, wp))[..., :h, :w]
        return logits, aux


class SegmenterSpec(ModelSpec):
    """The UperNet of :func:`build_segmenter`, in the ``segment`` params' names (``SegmenterSpec.from_config(cfg)``):
    ``num_classes`` (decode and auxiliary heads), ``crop_size`` (the backbone's position grid), ``channels``
    (UPerHead width), ``aux_channels`` (0: no auxiliary head), ``drop_path`` (the encoder's stochastic depth)."""

    task: ClassVar[str] = "segment"
    num_classes: Annotated[int, Field(ge=1)]
    crop_size: Annotated[int, Field(ge=1)]
    channels: Annotated[int, Field(ge=1)]
    aux_channels: Annotated[int, Field(ge=0)] = 256
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0


def build_segmenter(enc: EncoderSpec, spec: SegmenterSpec, *, pretrained: bool = True) -> Segmenter:
    """UperNet ``spec`` on the exported encoder ``enc`` (``pretrained=False``: the same encoder randomly
    initialised)."""
    backbone = EncoderFeatures(enc, img_size=spec.crop_size, drop_path=spec.drop_path, pretrained=pretrained)
    return Segmenter(backbone, spec.num_classes, spec.channels, spec.aux_channels)


__all__ = ["FCNHead", "Segmenter", "SegmenterSpec", "SwinNeck", "UPerHead", "ViTMultiScaleNeck", "build_segmenter"]

"""Mask R-CNN on the exported encoder (method §9.2): torchvision's ``MaskRCNN`` with a backbone built by params.

- ViT: ViTDet's simple feature pyramid from the last block's map (stride p = patch size): strides 4, 8, 16, 32
  by 2x2 transposed convs (LayerNorm + GELU between two of them) for upsampling and 2x2 max-pools for
  downsampling (p = 16: x4, x2, identity, /2 as in ViTDet), each level then a 1x1 and a 3x3 conv to 256 channels,
  each conv followed by a channel LayerNorm; P6 by stride-2 subsampling of the last level (``LastLevelMaxPool``).
  The position embedding is resampled to every input size (timm ``dynamic_img_size``). ``window_size`` > 0 turns
  on ViTDet's windowed attention in all blocks but ``global_blocks`` (:mod:`localmim.models.window_attention`;
  no relative position biases); off by default (the embedded 64-px grids are smaller than a window).
- Swin: the four stage outputs, each through a fresh LayerNorm, into torchvision's ``FeaturePyramidNetwork``
  (256 channels, ``LastLevelMaxPool``) as in Mask R-CNN FPN.

``min_size``/``max_size`` of the detector's transform follow ``image_size`` (never a fixed 800 px), and anchor
sizes scale with it (32..512 px at 1024 px, the Detectron2 / torchvision defaults).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Annotated, ClassVar

from pydantic import Field
from torch import Tensor, nn

from localmim.config.base import NonNegInt, PosInt
from localmim.models.backbone import EncoderFeatures
from localmim.models.encoder_io import EncoderSpec, ModelSpec

FPN_CHANNELS = 256
STRIDES = (4, 8, 16, 32)


def _layer_norm_2d(c: int) -> nn.Module:
    from timm.layers import LayerNorm2d

    return LayerNorm2d(c)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's neck: one ``[B, D, H/p, W/p]`` map -> ``{"0".."3": [B, 256, H/s, W/s]}`` for s in 4/8/16/32,
    plus ``"pool"`` at stride 64."""

    def __init__(self, dim: int, patch: int, out_channels: int = FPN_CHANNELS, strides=STRIDES):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.levels = nn.ModuleList()
        for s in strides:
            f = math.log2(patch / s)  # > 0: upsample 2^f, < 0: downsample
            if f != int(f):
                raise ValueError(f"patch size {patch} and stride {s} must differ by a power of 2")
            layers: list[nn.Module] = []
            c = dim
            for i in range(max(int(f), 0)):
                if i:
                    layers += [_layer_norm_2d(c), nn.GELU()]
                layers.append(nn.ConvTranspose2d(c, c // 2, 2, stride=2))
                c //= 2
            if f < 0:
                layers.append(nn.MaxPool2d(2 ** int(-f)))
            layers += [nn.Conv2d(c, out_channels, 1, bias=False), _layer_norm_2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), _layer_norm_2d(out_channels)]
            self.levels.append(nn.Sequential(*layers))
        self.top = LastLevelMaxPool()
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = [level(x) for level in self.levels]
        names = [str(i) for i in range(len(feats))]
        feats, names = self.top(feats, [x], names)
        return OrderedDict(zip(names, feats, strict=True))


class StageFPN(nn.Module):
    """Swin stage outputs -> fresh LayerNorm each -> torchvision ``FeaturePyramidNetwork`` (+ ``pool``)."""

    def __init__(self, in_channels: list[int], out_channels: int = FPN_CHANNELS):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.norms = nn.ModuleList(_layer_norm_2d(c) for c in in_channels)
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, feats: list[Tensor]) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), n(f)) for i, (n, f) in enumerate(zip(self.norms, feats, strict=True))))


class DetectionBackbone(nn.Module):
    """``images [B, 3, H, W]`` -> ``{"0".."3", "pool"}``: 256-channel maps at strides 4, 8, 16, 32, 64 (Swin: its
    stage strides, 4..32 for patch 4, then 64). The encoder sits at ``body.encoder``."""

    def __init__(self, enc: EncoderSpec, img_size: int, drop_path: float = 0.0, pretrained: bool = True,
                 window_size: int = 0, global_blocks: list[int] | None = None):
        super().__init__()
        from localmim.models.backbone import is_swin

        if is_swin(enc):
            if window_size:
                raise ValueError(f"window_size={window_size}: ViTDet windowed attention is for ViT encoders; "
                                 f"{enc.timm_name} is a Swin (its attention is windowed already)")
            self.body = EncoderFeatures(enc, img_size, drop_path=drop_path, pretrained=pretrained)
            self.neck = StageFPN(self.body.out_channels)
        else:
            depth = int(enc.timm_kwargs.get("depth", 12))
            self.body = EncoderFeatures(enc, img_size, indices=[depth - 1], drop_path=drop_path, pretrained=pretrained,
                                        window_size=window_size, global_blocks=global_blocks)
            self.neck = SimpleFeaturePyramid(self.body.out_channels[0], self.body.strides[0])
        _drop_unused_head(self.body.encoder)
        self.out_channels = FPN_CHANNELS

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(images)
        return self.neck(feats if self.body.swin else feats[-1])


def _drop_unused_head(encoder: nn.Module) -> None:
    """The final norms / head are never run (features are taken before them); removing them keeps DDP from
    waiting for their gradients and the layer-decay groups clean."""
    for name in ("norm", "fc_norm", "head_drop", "head"):
        if isinstance(getattr(encoder, name, None), nn.Module):
            setattr(encoder, name, nn.Identity())


def anchor_sizes(image_size: int, anchor_size: int = 0) -> tuple[tuple[int], ...]:
    """Five FPN levels' anchor sizes: ``a, 2a, .., 16a``; ``a`` = ``anchor_size`` or ``32 · image_size / 1024``
    (at least 4 px)."""
    a = anchor_size or max(4, round(32 * image_size / 1024))
    return tuple((a * 2**i,) for i in range(5))


class DetectorSpec(ModelSpec):
    """The Mask R-CNN of :func:`build_mask_rcnn`, in the ``detect`` params' names
    (``DetectorSpec.from_config(cfg, num_classes=...)``; defaults: torchvision's).

    Training resizes to a random short side from ``train_scales`` (empty: ``image_size``; must contain it
    otherwise), testing to ``image_size``; the long side is capped at ``max_size`` (0: ``image_size``, i.e.
    LSJ's square input). Heads: torchvision's two-MLP box head (``box_head_dim``, 1024 in torchvision) and
    four-conv mask head (``mask_head_channels``, 256 in torchvision); smaller only to fit CPU budgets.
    ``window_size``/``global_blocks``: ViTDet windowed attention for a ViT encoder (0: every block global;
    ``global_blocks`` empty: ViTDet's last block of each quarter). ``anchor_size``: see :func:`anchor_sizes`.
    """

    task: ClassVar[str] = "detect"
    num_classes: PosInt  # foreground classes (the detector adds the background)
    image_size: Annotated[int, Field(ge=32)]
    max_size: NonNegInt = 0
    train_scales: list[Annotated[int, Field(ge=32)]] = []
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0
    anchor_size: NonNegInt = 0
    window_size: NonNegInt = 0
    global_blocks: list[NonNegInt] = []
    rpn_batch_size_per_image: PosInt = 256
    box_batch_size_per_image: PosInt = 512
    detections_per_img: PosInt = 100
    box_head_dim: PosInt = 1024
    mask_head_channels: PosInt = 256


def build_mask_rcnn(enc: EncoderSpec, spec: DetectorSpec, *, pretrained: bool = True) -> nn.Module:
    """torchvision ``MaskRCNN`` (``spec.num_classes`` foreground classes + background) on
    :class:`DetectionBackbone` (``pretrained=False``: the same encoder randomly initialised); see
    :class:`DetectorSpec`.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    s = spec
    backbone = DetectionBackbone(enc, s.image_size, drop_path=s.drop_path, pretrained=pretrained,
                                 window_size=s.window_size, global_blocks=list(s.global_blocks) or None)
    scales = tuple(sorted(set(s.train_scales) - {s.image_size})) + (s.image_size,)  # eval uses the last one
    anchors = AnchorGenerator(anchor_sizes(s.image_size, s.anchor_size), ((0.5, 1.0, 2.0),) * 5)
    c, k, m = FPN_CHANNELS, s.num_classes + 1, s.mask_head_channels
    return MaskRCNN(backbone, min_size=scales, max_size=s.max_size or s.image_size, rpn_anchor_generator=anchors,
                    rpn_batch_size_per_image=s.rpn_batch_size_per_image,
                    box_batch_size_per_image=s.box_batch_size_per_image,
                    box_detections_per_img=s.detections_per_img, box_head=TwoMLPHead(c * 7 * 7, s.box_head_dim),
                    box_predictor=FastRCNNPredictor(s.box_head_dim, k), mask_head=MaskRCNNHeads(c, [m] * 4, 1),
                    mask_predictor=MaskRCNNPredictor(m, m, k))


__all__ = ["DetectionBackbone", "DetectorSpec", "SimpleFeaturePyramid", "StageFPN", "anchor_sizes",
           "build_mask_rcnn"]

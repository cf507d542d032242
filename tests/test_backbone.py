"""The dense-task backbone (models/backbone.py) and the layer-decay groups of a model holding it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localmim.models.backbone import EncoderFeatures
from localmim.models.layer_decay import param_groups_with_decay
from tests.encoders import micro_spec


def test_vit_features_at_the_taps_any_size():
    enc = micro_spec("vit")
    bb = EncoderFeatures(enc, img_size=48)
    depth = len(bb.encoder.blocks)
    assert len(bb.indices) == 4 and bb.indices == sorted(set(bb.indices)) and bb.indices[-1] == depth - 1
    for h, w in [(48, 48), (40, 64)]:
        feats = bb(torch.randn(2, 3, h, w))
        assert [tuple(f.shape) for f in feats] == [(2, bb.out_channels[0], h // 8, w // 8)] * 4
    # weights are the exported ones: block 0's qkv equals the state dict's (pretrained=False differs)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(bb.encoder.state_dict()[key], enc.state_dict[key])
    assert not torch.equal(EncoderFeatures(enc, 48, pretrained=False).encoder.state_dict()[key], enc.state_dict[key])


def test_vit_features_equal_a_plain_block_loop():
    """Independent of timm's forward_intermediates: run patch embed + pos embed + blocks by hand."""
    bb = EncoderFeatures(micro_spec("vit"), img_size=32).eval()
    enc = bb.encoder
    x = torch.randn(1, 3, 32, 32)
    t = enc.patch_embed(x)  # [1, 4, 4, D] (dynamic size: NHWC)
    t = t.reshape(1, -1, t.shape[-1])
    t = torch.cat([enc.cls_token.expand(1, -1, -1), t], 1) + enc.pos_embed
    ref = []
    for i, blk in enumerate(enc.blocks):
        t = blk(t)
        if i in bb.indices:
            ref.append(t[:, 1:].transpose(1, 2).reshape(1, -1, 4, 4))
    for a, b in zip(bb(x), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swin_four_stages():
    bb = EncoderFeatures(micro_spec("swin"), img_size=64)
    feats = bb(torch.randn(1, 3, 64, 96))
    assert bb.strides == [2, 4, 8, 16]
    expect = [(1, c, 64 // s, 96 // s) for c, s in zip(bb.out_channels, bb.strides, strict=True)]
    assert [tuple(f.shape) for f in feats] == expect


class _Head(nn.Module):
    def __init__(self, bb: EncoderFeatures):
        super().__init__()
        self.backbone = bb
        self.neck = nn.Conv2d(bb.out_channels[0], 4, 1)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_layer_decay_of_a_wrapped_backbone(family):
    """Scales from the method §8.1 rules written out by hand: ViT embed 0, block i -> i+1, rest L+1; Swin:
    patch embed 0, block j of stage s -> sum(depths[:s]) + j + 1, the merge in front of stage s -> sum(depths[:s])."""
    bb = EncoderFeatures(micro_spec(family), img_size=64 if family == "swin" else 32)
    model = _Head(bb)
    groups = param_groups_with_decay(model, bb.encoder, "backbone.encoder.", weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    if family == "vit":
        top = len(bb.encoder.blocks) + 1
        expect = {"backbone.encoder.patch_embed.proj.weight": 0, "backbone.encoder.blocks.0.mlp.fc1.weight": 1,
                  f"backbone.encoder.blocks.{top - 2}.attn.qkv.weight": top - 1, "neck.weight": top}
        no_wd = ["backbone.encoder.pos_embed", "backbone.encoder.cls_token", "neck.bias"]
    else:
        depths = [len(layer.blocks) for layer in bb.encoder.layers]
        top = sum(depths) + 1
        expect = {"backbone.encoder.patch_embed.proj.weight": 0,
                  "backbone.encoder.layers.0.blocks.1.mlp.fc1.weight": 2,
                  "backbone.encoder.layers.2.downsample.reduction.weight": depths[0] + depths[1],
                  "backbone.encoder.layers.2.blocks.0.attn.qkv.weight": depths[0] + depths[1] + 1,
                  "neck.weight": top}
        no_wd = ["backbone.encoder.layers.0.blocks.0.norm1.weight", "neck.bias"]
    for name, lid in expect.items():
        assert scale[id(named[name])] == pytest.approx(0.5 ** (top - lid)), name
        assert wd[id(named[name])] == 0.05, name
    for name in no_wd:
        assert wd[id(named[name])] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(named)

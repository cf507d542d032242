"""Swin pre-training initialisation and weight-decay groups (method §3.9), checked against the rules as written:
Xavier-uniform Linear weights and zero biases, LayerNorm 1/0, Xavier-uniform on the flattened patch-embed conv,
truncated-normal(0.02) relative-position tables, normal(0.02) mask tokens, fixed sin-cos decoder position
embeddings; weight decay on everything except <= 1-D parameters, biases and names holding "position_bias" or
"token"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localmim.models import create
from localmim.train.optim import create_adamw
from tests.vit_reference import np_sincos


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create("localmim_swin_tiny_p2_64")  # C 96: matrices large enough for the spread checks below


def _uniform_bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape[0], w[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_linear_layers_are_xavier_uniform_with_zero_bias(model):
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 40  # encoder qkv/proj/fc1/fc2 + merges, decoder embeds/blocks, heads
    for name, lin in linears:
        w, bound = lin.weight.detach().double(), _uniform_bound(lin.weight)
        assert w.abs().max() <= bound, name
        if w.numel() >= 4096:  # U(-a, a) has std a / sqrt(3); torch's default Linear init is sqrt(3) x narrower
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
        if lin.bias is not None:
            assert torch.all(lin.bias == 0), name


def test_patch_embed_is_xavier_on_the_flattened_weight(model):
    w = model.encoder.patch_embed.proj.weight.detach().double()  # [C, 3, p0, p0]
    flat = w.reshape(w.shape[0], -1)  # the (C, 3 p0^2) matrix the bound refers to
    bound = math.sqrt(6.0 / (flat.shape[0] + flat.shape[1]))
    assert flat.abs().max() <= bound and flat.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_layer_norms_are_one_and_zero(model):
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) > 20
    for ln in norms:
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_relative_position_tables_and_mask_tokens_have_std_002(model):
    tables = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "relative_position_bias" in n])
    assert tables.numel() > 1000
    assert tables.std().item() == pytest.approx(0.02, rel=0.1) and abs(tables.mean().item()) < 0.004
    tokens = torch.cat([d.mask_token.detach().flatten() for d in model.decoders])
    assert tokens.numel() == 64 + 3 * 128  # decoder widths (d/2, d, d, d) with d_dec = 128
    assert tokens.std().item() == pytest.approx(0.02, rel=0.25) and not torch.all(tokens == 0)


def test_decoder_position_embeddings_are_fixed_sincos(model):
    for dec, grid in zip(model.decoders, model.tap_grids, strict=True):
        pe = dec.pos_embed
        assert not pe.requires_grad and pe.shape == (1, grid * grid, dec.embed.out_features)
        np.testing.assert_allclose(pe[0].double().numpy(), np_sincos(grid, grid, pe.shape[-1]), atol=1e-6)
    assert not any("pos_embed" in n for n, _ in model.named_parameters())


def test_weight_decay_groups_follow_the_rules(model):
    opt = create_adamw(model, 1e-3, 0.05)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(decay) == len(named)
    for name, p in named.items():
        plain = p.ndim <= 1 or name.endswith(".bias") or "position_bias" in name or "token" in name
        assert decay[id(p)] == (0.0 if plain else 0.05), name
    # the 2-D and 3-D exceptions exist, so the name rule is really exercised
    assert any("relative_position_bias_table" in n and p.ndim == 2 for n, p in named.items())
    assert any("mask_token" in n and p.ndim == 3 for n, p in named.items())

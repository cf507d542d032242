"""Tests of the columnar LocalMIM model (method §2, §14.1, §15, §16); its building blocks: test_models_common.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localmim.models import create, list_models
from localmim.models.vit import LocalMIMViT, default_taps
from tests.vit_reference import np_masked_mse, np_resize_mask, np_sincos

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, decoder_dim=32, decoder_heads=2)


def smooth_images(b: int, s: int, seed: int) -> torch.Tensor:
    """uint8 images made of a few low-frequency sinusoids per channel (learnable, non-trivial targets)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
    out = torch.zeros(b, 3, s, s, dtype=torch.float64)
    for _ in range(3):
        f = torch.rand(b, 3, 2, 1, 1, generator=g, dtype=torch.float64) * 4 * math.pi / s
        ph = torch.rand(b, 3, 1, 1, generator=g, dtype=torch.float64) * 2 * math.pi
        out += torch.sin(f[:, :, 0] * xx + f[:, :, 1] * yy + ph)
    return ((out / 3 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------- model structure


@pytest.mark.parametrize("depth,taps", [(12, [1, 3, 9, 11]), (24, [1, 3, 21, 23]), (32, [1, 3, 29, 31]),
                                        (7, [1, 3, 4, 6]), (6, [0, 1, 4, 5]), (5, [0, 1, 3, 4]), (4, [0, 1, 2, 3])])
def test_default_taps(depth, taps):
    assert default_taps(depth) == taps


def _meta(name: str, **kw) -> LocalMIMViT:
    with torch.device("meta"):
        return create(name, **kw)


@pytest.mark.parametrize("name,total,encoder,decoders", [
    ("localmim_vit_small_patch16", 25_463_276, 21_592_320, [1_055_131, 1_023_771, 896_027, 896_027]),
    ("localmim_vit_base_patch16", 89_916_140, 85_651_968, [1_153_435, 1_122_075, 994_331, 994_331]),
    ("localmim_vit_large_patch16", 307_651_480, 303_106_048, [1_220_726, 1_191_094, 1_066_806, 1_066_806]),
])
def test_trainable_parameter_counts_spec16(name, total, encoder, decoders):
    m = _meta(name)
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == total
    enc_prefixes = ("patch_embed.", "cls_token", "blocks.", "tap_norms.")
    assert sum(v for n, v in trainable.items() if n.startswith(enc_prefixes)) == encoder
    per_dec = [sum(v for n, v in trainable.items() if n.startswith((f"decoders.{k}.", f"heads.{k}.")))
               for k in range(4)]
    assert per_dec == decoders
    assert "pos_embed" in dict(m.named_buffers()) and "pos_embed" not in trainable


def test_vit_large_recipe_has_frozen_hog_biases():
    m = create("localmim_vit_large_patch16", depth=4, embed_dim=64, num_heads=2, img_size=64)
    assert m.hog_nbins == 18
    assert m.hog_biases.shape == (4, 2) and not m.hog_biases.requires_grad
    assert "hog_biases" in m.state_dict()
    assert torch.all(m.hog_biases.abs() <= 1 / 3) and len({tuple(b.tolist()) for b in m.hog_biases}) == 4
    assert "hog_biases" not in dict(m.named_parameters())


def _record_shapes(m: LocalMIMViT, b: int, s: int):
    """Run ``m`` on the meta device with given (meta) targets and record the §2.6 intermediate shapes."""
    shapes: dict[str, list] = {"taps": [], "dec": [], "pred": []}
    for norm in m.tap_norms:
        norm.register_forward_hook(lambda mod, i, o: shapes["taps"].append(tuple(o.shape)))
    for dec in m.decoders:
        dec.embed.register_forward_hook(lambda mod, i, o: shapes["dec"].append(tuple(o.shape)))
        dec.blocks[0].register_forward_hook(lambda mod, i, o: shapes["dec"].append(tuple(o.shape)))
    for head in m.heads:
        head.register_forward_hook(lambda mod, i, o: shapes["pred"].append(tuple(o.shape)))
    with torch.device("meta"):
        x = torch.empty(b, 3, s, s)
        tg = [torch.empty(b, (s // c) ** 2, f) for c, f in zip(m.target_cells, m.target_dims, strict=True)]
        loss, parts, mask = m(x, targets=tg)
    return shapes, loss, parts, mask


def test_shapes_vit_base_224_spec26():
    m = _meta("localmim_vit_base_patch16")
    assert m.target_cells == [4, 8, 16, 32] and m.target_dims == [27] * 4 and m.taps == [1, 3, 9, 11]
    shapes, loss, parts, mask = _record_shapes(m, 2, 224)
    assert shapes["taps"] == [(2, 50, 768)] * 4
    assert shapes["dec"] == [(2, 50, 256), (2, 197, 256)] * 4
    assert shapes["pred"] == [(2, 27, 56, 56), (2, 27, 28, 28), (2, 27, 14, 14), (2, 27, 7, 7)]
    assert mask.shape == (2, 196) and loss.shape == () and set(parts) == {"tap1", "tap2", "tap3", "tap4"}


def test_shapes_vit_large_224():
    m = _meta("localmim_vit_large_patch16")
    assert m.taps == [1, 3, 21, 23] and m.target_dims == [54] * 4
    shapes, *_ = _record_shapes(m, 1, 224)
    assert shapes["taps"] == [(1, 50, 1024)] * 4
    assert shapes["pred"] == [(1, 54, 56, 56), (1, 54, 28, 28), (1, 54, 14, 14), (1, 54, 7, 7)]


@pytest.mark.parametrize("s,p,grids,cells,keep", [
    (64, 16, [16, 8, 4, 2], [4, 8, 16, 32], 4),
    (64, 8, [32, 16, 8, 4], [2, 4, 8, 16], 16),
    (32, 8, [16, 8, 4, 2], [2, 4, 8, 16], 4),
    (32, 4, [32, 16, 8, 4], [1, 2, 4, 8], 16),
])
def test_small_image_geometry_spec14(s, p, grids, cells, keep):
    with torch.device("meta"):
        m = LocalMIMViT(**{**MICRO, "img_size": s, "patch_size": p})
    assert m.target_cells == cells
    assert [s // c for c in m.target_cells] == grids  # identity S / c_k = G_k
    shapes, *_ = _record_shapes(m, 2, s)
    assert shapes["taps"] == [(2, 1 + keep, 64)] * 4
    assert [sh[2] for sh in shapes["pred"]] == grids


def test_pixel_target_dims():
    m = LocalMIMViT(**MICRO, target="pixel")
    assert m.target_dims == [3 * 2**2, 3 * 4**2, 3 * 8**2, 3 * 16**2]
    mae = create("mae_vit_micro_patch8")
    assert mae.target == "pixel" and mae.target_cells == [8] and mae.target_dims == [192] and mae.taps == [3]


def test_taps_feed_the_right_blocks():
    torch.manual_seed(0)
    m = LocalMIMViT(**{**MICRO, "depth": 8})  # taps after blocks 2, 4, 6, 8 (1-indexed)
    outs, tap_in = {}, []
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, inp, o, i=i: outs.__setitem__(i, o))
    for norm in m.tap_norms:
        norm.register_forward_hook(lambda mod, inp, o: tap_in.append(inp[0]))
    m.forward_features(torch.randn(2, 3, 32, 32))
    assert m.taps == [1, 3, 5, 7]
    for k, t in enumerate(m.taps):
        assert tap_in[k] is outs[t]


# ------------------------------------------------------------------------------------------- loss composition


def test_loss_is_sum_of_spec_losses():
    """Per-tap loss = NumPy §2.5 loss of the prediction vs target with the §2.4-resized mask; total = sum."""
    torch.manual_seed(0)
    m = LocalMIMViT(**MICRO)
    preds = []
    orig = m.forward_decoder
    m.forward_decoder = lambda k, z, ids: preds.append(orig(k, z, ids)) or preds[-1]
    x = torch.randn(3, 3, 32, 32)
    g = torch.Generator().manual_seed(5)
    tg = [torch.rand(3, (32 // c) ** 2, f, generator=g) for c, f in zip(m.target_cells, m.target_dims, strict=True)]
    loss, parts, mask = m(x, targets=tg, generator=torch.Generator().manual_seed(1))
    grid = mask.view(3, 4, 4).double().numpy()
    total = 0.0
    for k, s in enumerate([4, 2, 1, 0.5]):
        w = np_resize_mask(grid, s)
        ref = np_masked_mse(preds[k].detach().double().numpy(), tg[k].double().numpy(), w)
        assert parts[f"tap{k + 1}"].item() == pytest.approx(ref, rel=1e-5)
        assert not parts[f"tap{k + 1}"].requires_grad
        total += ref
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_loss_zero_when_prediction_equals_target():
    torch.manual_seed(0)
    m = LocalMIMViT(**MICRO).eval()
    x = torch.randn(2, 3, 32, 32)
    preds = []
    orig = m.forward_decoder
    m.forward_decoder = lambda k, z, ids: preds.append(orig(k, z, ids)) or preds[-1]
    dummy = [torch.zeros(2, (32 // c) ** 2, f) for c, f in zip(m.target_cells, m.target_dims, strict=True)]
    m(x, targets=dummy, generator=torch.Generator().manual_seed(7))
    loss, parts, _ = m(x, targets=[p.detach() for p in preds], generator=torch.Generator().manual_seed(7))
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())


def test_masking_differs_per_sample_and_visible_counts():
    m = LocalMIMViT(**{**MICRO, "img_size": 64})  # g = 8, N = 64
    x = torch.randn(4, 3, 64, 64)
    tg = [torch.zeros(4, (64 // c) ** 2, f) for c, f in zip(m.target_cells, m.target_dims, strict=True)]
    _, _, mask = m(x, targets=tg)
    assert torch.all(mask.sum(1) == 48)
    assert len({tuple(r.tolist()) for r in mask}) == 4
    _, _, mask = m(x, mask_ratio=0.5, targets=tg)
    assert torch.all(mask.sum(1) == 32)


def test_grad_isolation_segments():
    """With grad_isolate each loss only reaches the blocks of its own segment (method §10.1 [X])."""
    torch.manual_seed(0)
    m = LocalMIMViT(**{**MICRO, "depth": 8}, grad_isolate=True)  # taps 1, 3, 5, 7 (0-based)
    z, _, ids = m.forward_encoder(torch.randn(2, 3, 32, 32), 0.75)
    owner = [0, 0, 1, 1, 2, 2, 3, 3]  # segment that owns block i
    for k in range(4):
        pred = m.forward_decoder(k, z[k], ids)
        params = [p for blk in m.blocks for p in blk.parameters()]
        grads = torch.autograd.grad(pred.square().sum(), params, allow_unused=True, retain_graph=True)
        per_block = np.split(np.array([g is not None and bool(g.abs().sum() > 0) for g in grads]), 8)
        reached = [bool(b.any()) for b in per_block]
        assert reached == [owner[i] == k for i in range(8)], k
    # without isolation the top loss reaches every block
    m.grad_isolate = False
    z, _, ids = m.forward_encoder(torch.randn(2, 3, 32, 32), 0.75)
    g = torch.autograd.grad(m.forward_decoder(3, z[3], ids).sum(), m.blocks[0].attn.qkv.weight)[0]
    assert g.abs().sum() > 0


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kw,match", [
    (dict(img_size=30), "30x30 is not divisible by the patch size 8"),
    (dict(img_size=40), "even patch grid, got 5x5"),
    (dict(img_size=24, patch_size=6), "6/4"),
    (dict(decoder_dim=30), "decoder_dim 30"),
    (dict(decoder_dim=36, decoder_heads=8), "decoder_heads 8"),
    (dict(embed_dim=66), "embed_dim 66"),
    (dict(depth=3), "depth must be >= 4, got 3"),
    (dict(depth=0, mode="mae"), "depth must be >= 1, got 0"),
    (dict(mode="simmim"), "simmim"),
    (dict(target="dino"), "dino"),
    (dict(hog_nbins=0), "hog_nbins"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        LocalMIMViT(**{**MICRO, **kw})


def test_mae_mode_allows_odd_grid_and_small_depth():
    m = LocalMIMViT(**{**MICRO, "img_size": 40, "depth": 2}, mode="mae")  # g = 5: no 1/2 scale in MAE
    assert m.taps == [1] and m.loss_names == ["top"]


def test_registry():
    names = list_models()
    for size in ("micro_patch8", "tiny_patch8", "tiny_patch16", "small_patch16", "base_patch16", "large_patch16"):
        assert f"localmim_vit_{size}" in names and f"mae_vit_{size}" in names
    with pytest.raises(ValueError, match="localmim_vit_base_patch16"):
        create("localmim_vit_huge_patch14")
    m = create("localmim_vit_micro_patch8", img_size=64)
    assert m.img_size == 64 and m.grid_size == (8, 8) and m.patch_size == 8
    t = _meta("localmim_vit_tiny_patch8")
    assert (t.img_size, t.patch_size, len(t.blocks), t.cls_token.shape[-1]) == (64, 8, 12, 192)


def test_init_spec27():
    torch.manual_seed(0)
    m = LocalMIMViT(**MICRO)
    qkv = m.blocks[0].attn.qkv
    bound = math.sqrt(6 / (qkv.in_features + qkv.out_features))
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound  # xavier-uniform
    assert torch.all(qkv.bias == 0) and torch.all(m.decoders[0].embed.bias == 0)
    assert torch.all(m.tap_norms[0].weight == 1) and torch.all(m.heads[0][1].weight == 1)
    w = m.patch_embed.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w[0].numel()))
    conv = m.heads[2][0]  # framework-default conv init: kaiming-uniform(a=sqrt 5) bound 1/sqrt(fan_in)
    assert conv.weight.abs().max() <= 1 / math.sqrt(conv.in_channels) and conv.bias.abs().sum() > 0
    assert 0.01 < m.cls_token.std() < 0.03 and 0.01 < m.decoders[1].mask_token.std() < 0.03
    np.testing.assert_allclose(m.pos_embed[0, 1:].numpy(), np_sincos(4, 4, 64), atol=1e-6)


# ------------------------------------------------------------------------------------------- full pipeline


def test_uint8_and_normalised_inputs_agree():
    from localmim.targets import normalize

    torch.manual_seed(0)
    x = smooth_images(2, 32, 3)
    for target in ("hog", "pixel"):
        m = LocalMIMViT(**MICRO, target=target)
        a = m(x, generator=torch.Generator().manual_seed(2))
        b = m(normalize(x), generator=torch.Generator().manual_seed(2))
        assert torch.equal(a[2], b[2])
        # HOG of the normalised image differs slightly at exact bin edges (method §13.18)
        rel = 1e-2 if target == "hog" else 1e-4
        for k in a[1]:
            assert a[1][k].item() == pytest.approx(b[1][k].item(), rel=rel, abs=1e-6), (target, k)


@pytest.mark.parametrize("name,kw", [("localmim_vit_micro_patch8", dict(target="hog")),
                                     ("localmim_vit_micro_patch8", dict(target="pixel")),
                                     ("mae_vit_micro_patch8", {})])
def test_overfit_fixed_batch(name, kw):
    """Loss on a fixed batch with a fixed mask falls by >= 90% in 150 AdamW steps."""
    torch.manual_seed(0)
    m = create(name, **kw)
    x = smooth_images(2, 32, 1)
    tg = m.compute_targets(x)
    assert [t.shape for t in tg] == [(2, (32 // c) ** 2, f) for c, f in zip(m.target_cells, m.target_dims,
                                                                             strict=True)]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss, _, _ = m(x, targets=tg, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() <= 0.1 * first, (first, loss.item())


def test_hog_bias_reaches_the_targets():
    from localmim.targets import hog_multiscale, to_tokens

    torch.manual_seed(0)
    x = smooth_images(2, 32, 4)
    m = LocalMIMViT(**MICRO, hog_bias=True, hog_nbins=18)
    got = m.compute_targets(x)
    want = [to_tokens(t) for t in hog_multiscale(x, 18, [2, 4, 8, 16], [b for b in m.hog_biases])]
    plain = [to_tokens(t) for t in hog_multiscale(x, 18, [2, 4, 8, 16])]
    for g, w, p in zip(got, want, plain, strict=True):
        assert torch.equal(g, w) and not torch.equal(g, p)
    m2 = LocalMIMViT(**MICRO, hog_bias=True, hog_nbins=18)
    m2.load_state_dict(m.state_dict())  # the drawn biases travel with the checkpoint
    assert torch.equal(m2.hog_biases, m.hog_biases)


def test_bf16_autocast_and_half_precision_targets():
    torch.manual_seed(0)
    m = LocalMIMViT(**MICRO)
    tg = [torch.rand(2, (32 // c) ** 2, f).half() for c, f in zip(m.target_cells, m.target_dims, strict=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts, _ = m(torch.randn(2, 3, 32, 32), targets=tg)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and m.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="expected 4 target tensors"):
        m(torch.randn(2, 3, 32, 32), targets=tg[:3])

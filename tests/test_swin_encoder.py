"""The Swin LocalMIM visible-only encoder (method §3.3) against timm's Swin (nothing masked) and a dense masked
reference written block by block (shifted and partial windows), and masked pixels never reaching visible features."""

from __future__ import annotations

import json
from functools import partial

import pytest
import timm
import torch
from timm.models.swin_transformer import window_partition, window_reverse

from localmim.models.swin import LocalMIMSwin, export_swin_encoder
from localmim.models.swin_encoder import SwinVisibleEncoder
from localmim.models.swin_geometry import draw_cell_mask
from tests.swin_reference import block_order

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (LN affine, biases, rel-pos tables) so every parameter shows in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if "relative_position_bias_table" in name else 0.1
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _pick(grid_nhwc: torch.Tensor, coords: list[tuple[int, int]]) -> torch.Tensor:
    ys = torch.tensor([c[0] for c in coords])
    xs = torch.tensor([c[1] for c in coords])
    return grid_nhwc[:, ys, xs]  # [B, L, C]


def _ref_block(blk, x: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Full-grid timm window attention (cyclic shift + timm region mask) with masked tokens removed from the keys."""
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    n, heads = wh * ww, blk.attn.num_heads
    h, v = blk.norm1(x), vis.to(x.dtype)[None, :, :, None]  # [B, H, W, C], [1, H, W, 1]
    h, v = torch.roll(h, (-sh, -sw), (1, 2)), torch.roll(v, (-sh, -sw), (1, 2))
    hw = window_partition(h, (wh, ww)).reshape(-1, n, C)  # [B*nW, n, C]
    keep = window_partition(v, (wh, ww)).reshape(-1, n) > 0  # [nW, n]
    q, k, val = blk.attn.qkv(hw).reshape(hw.shape[0], n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    s = (q * blk.attn.scale) @ k.transpose(-2, -1)  # [B*nW, heads, n, n]
    table = blk.attn.relative_position_bias_table[blk.attn.relative_position_index.view(-1)]
    s = s + table.view(n, n, heads).permute(2, 0, 1)[None]
    s = s.view(B, -1, heads, n, n)
    if blk.attn_mask is not None:
        s = s + blk.attn_mask.to(x.dtype)[None, :, None]
    s = s.masked_fill(~keep[None, :, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).view(-1, heads, n, n)  # fully masked windows -> 0
    o = blk.attn.proj((p @ val).transpose(1, 2).reshape(-1, n, C))
    o = window_reverse(o.view(-1, wh, ww, C), (wh, ww), H, W)
    x = x + torch.roll(o, (sh, sw), (1, 2))
    x = x + blk.mlp(blk.norm2(x))
    return torch.where(vis[None, :, :, None], x, torch.zeros_like(x))


def _ref_taps(enc: SwinVisibleEncoder, images: torch.Tensor, cell_mask: torch.Tensor) -> list[torch.Tensor]:
    """Dense reference on the full grid; masked tokens are zeroed and never used as keys."""
    g = enc.grid
    vis_cells = ~cell_mask.view(g, g)
    x, taps = enc.patch_embed(images), []
    for i, stage in enumerate(enc.layers):
        if i > 0:
            x = stage.downsample(x)
            taps.append(x)
        b = x.shape[1] // g
        vis = vis_cells.repeat_interleave(b, 0).repeat_interleave(b, 1)  # [R, R]
        x = torch.where(vis[None, :, :, None], x, torch.zeros_like(x))
        for blk in stage.blocks:
            x = _ref_block(blk, x, vis)
    taps.append(x)
    return taps


def _encoder(img, p0, window, attn_impl="auto", depths=(2, 2, 2, 2), dim=16, heads=(1, 2, 2, 4)):
    enc = SwinVisibleEncoder(img, p0, dim, depths, heads, window, attn_impl=attn_impl).double().eval()
    _randomise(enc)
    return enc


# ------------------------------------------------------------------------------------------------ encoder numerics


@pytest.mark.parametrize("attn_impl", ["packed", "dense"])
def test_unmasked_encoder_matches_timm_swin(attn_impl):
    # 64 px, p0 2, w 4: stage resolutions 32/16/8/4 -> shifted windows active in stages 1-3
    torch.manual_seed(0)
    model = LocalMIMSwin(img_size=64, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                         window_size=4, decoder_dim=32, target="pixel", attn_impl=attn_impl).eval()
    _randomise(model)
    name, kwargs, state = export_swin_encoder(model, include_final_norm=True)  # tap-4 LN as timm's norm
    assert name == "swin_c16d2222_patch2_window4_64" and not timm.is_model(name)  # says what it is
    kwargs = json.loads(json.dumps(kwargs))  # as encoder.json stores them (JSON: tuples become lists)
    plain = timm.models.SwinTransformer(num_classes=10, **kwargs)  # as fine-tuning builds it (LN eps 1e-5)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["head.fc.bias", "head.fc.weight"]
    ref = timm.models.SwinTransformer(num_classes=10, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == ["head.fc.bias", "head.fc.weight"]
    assert any(b.shift_size[0] > 0 for b in ref.layers[0].blocks)

    x = torch.randn(2, 3, 64, 64)
    g, enc = model.grid, model.encoder
    taps = enc(x, torch.arange(g * g))
    with torch.no_grad():
        stages = [s.permute(0, 2, 3, 1) for s in ref.forward_intermediates(x, intermediates_only=True)]  # NHWC
        expected = [ref.layers[k + 1].downsample(stages[k]) for k in range(3)] + [stages[3]]
        final = ref.forward_features(x)  # timm final norm on stage 4 = exported tap-4 norm
    for k, (t, e) in enumerate(zip(taps, expected, strict=True)):
        side = e.shape[1] // g
        torch.testing.assert_close(t, _pick(e, block_order(list(range(g * g)), g, side)), atol=1e-4, rtol=1e-4,
                                   msg=f"tap {k + 1}")
    torch.testing.assert_close(model.forward_features(x)[3], final.flatten(1, 2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("img", "p0", "window", "attn_impl"),
    [(64, 2, 4, "packed"), (64, 2, 4, "dense"), (64, 2, 4, "auto"), (96, 2, 6, "packed"), (64, 2, 8, "packed"),
     (48, 1, 3, "packed"), (48, 1, 3, "dense")],  # odd window: shift 1 != w - shift 2
)
def test_masked_encoder_matches_dense_reference(img, p0, window, attn_impl):
    torch.manual_seed(1)
    enc = _encoder(img, p0, window, attn_impl)
    g = enc.grid
    x = torch.randn(2, 3, img, img, dtype=torch.float64)
    for trial in range(3):
        cell_mask = draw_cell_mask(g * g, 0.6, generator=torch.Generator().manual_seed(trial))
        visible = (~cell_mask).nonzero()[:, 0]
        with torch.no_grad():
            taps = enc(x, visible)
            ref = _ref_taps(enc, x, cell_mask)
        for k, (t, r) in enumerate(zip(taps, ref, strict=True)):
            expected = _pick(r, block_order(visible.tolist(), g, r.shape[1] // g))
            torch.testing.assert_close(t, expected, atol=1e-9, rtol=1e-9, msg=f"trial {trial} tap {k + 1}")


def test_reference_sees_shift_and_partial_windows():
    # guard that the configs above exercise shifted windows that straddle visible and masked cells
    enc = _encoder(96, 2, 6)
    assert [s.blocks[1].shift_size[0] for s in enc.layers] == [3, 3, 3, 0]
    assert [s.blocks[0].window_size[0] for s in enc.layers] == [6, 6, 6, 6]


def test_masked_pixels_do_not_change_visible_features():
    torch.manual_seed(2)
    enc = _encoder(64, 2, 4)
    cell_mask = draw_cell_mask(16, 0.75, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    pix = cell_mask.view(4, 4).repeat_interleave(16, 0).repeat_interleave(16, 1)  # [64, 64] masked pixels
    y = torch.where(pix, torch.randn_like(x), x)
    visible = (~cell_mask).nonzero()[:, 0]
    for a, b in zip(enc(x, visible), enc(y, visible), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

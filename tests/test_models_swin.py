"""Swin LocalMIM: masks, shapes, loss, decoders, export, configuration, overfit (the visible-only encoder's
numerics: test_swin_encoder.py)."""

from __future__ import annotations

import math

import pytest
import torch

from localmim.models import create
from localmim.models.swin import LocalMIMSwin, export_swin_encoder
from localmim.models.swin_geometry import draw_cell_mask
from tests.swin_reference import block_order

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ masking


@pytest.mark.parametrize(("cells", "ratio"), [(49, 0.75), (16, 0.75), (16, 0.6), (4, 0.75), (64, 0.9), (49, 0.0)])
def test_mask_counts(cells, ratio):
    m = draw_cell_mask(cells, ratio)
    assert m.dtype == torch.bool and m.shape == (cells,)
    assert int(m.sum()) == cells - max(1, math.floor(cells * (1 - ratio)))
    if math.floor(ratio * cells) + 1 < cells:
        assert int(draw_cell_mask(cells, ratio, reference_count=True).sum()) == math.floor(ratio * cells) + 1


def test_reference_count_without_visible_cells_raises():
    with pytest.raises(ValueError, match="4 of 4"):
        draw_cell_mask(4, 0.75, reference_count=True)
    with pytest.raises(ValueError, match="mask_ratio"):
        draw_cell_mask(16, 1.0)


# ------------------------------------------------------------------------------------------------ full model


class _Capture:
    """Forward hooks collecting the decoder head outputs (predictions in raster order)."""

    def __init__(self, model):
        self.preds = []
        self.handles = [h.register_forward_hook(lambda m, i, o: self.preds.append(o)) for h in model.heads]

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def swin_base():
    torch.manual_seed(0)
    return create("localmim_swin_base", reference_mask_count=True).eval()


def test_swin_base_224_shapes(swin_base):
    m = swin_base
    assert (m.img_size, m.patch_size, m.grid, m.hog_nbins, m.target) == (224, 4, 7, 18, "hog")
    assert m.target_cells == [8, 16, 32, 32] and m.tap_grids == [28, 14, 7, 7] and m.target_dims == [54] * 4
    assert [d.embed.out_features for d in m.decoders] == [64, 128, 128, 128]
    assert all(d.blocks[0].attn.num_heads == 4 and len(d.blocks) == 1 for d in m.decoders)
    assert tuple(m.hog_biases.shape) == (4, 2)
    cell_mask = m.draw_mask(0.75)
    assert int((~cell_mask).sum()) == 12  # reference rule: floor(0.75*49)+1 = 37 masked
    x = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    seen = []
    norm1 = m.encoder.layers[0].blocks[0].norm1
    hook = norm1.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        taps = m.encoder(m._to_input(x), (~cell_mask).nonzero()[:, 0])
        hook.remove()
        assert seen == [(1, 768, 128)]  # stage 1 runs on 12 cells x 64 tokens only
        assert [tuple(t.shape) for t in taps] == [(1, 192, 256), (1, 48, 512), (1, 12, 1024), (1, 12, 1024)]
        cap = _Capture(m)
        targets = [torch.zeros(1, g * g, 54) for g in (28, 14, 7, 7)]
        loss, parts, mask = m(x, targets=targets, cell_mask=cell_mask)
        cap.close()
    assert [tuple(p.shape) for p in cap.preds] == [(1, 784, 54), (1, 196, 54), (1, 49, 54), (1, 49, 54)]
    assert tuple(mask.shape) == (1, 49) and float(mask.sum()) == 37
    assert sorted(parts) == ["tap1", "tap2", "tap3", "tap4"] and torch.isfinite(loss)
    assert export_swin_encoder(m)[0] == "swin_base_patch4_window7_224"


def test_swin_base_pixel_dims_and_stage_windows():
    m = create("localmim_swin_base", target="pixel", depths=(2, 2, 2, 2))  # shallower stage 3: same geometry
    assert m.target_dims == [192, 768, 3072, 3072]
    assert [(s.blocks[-1].window_size[0], s.blocks[-1].shift_size[0]) for s in m.encoder.layers] == [
        (7, 3), (7, 3), (7, 3), (7, 0)]


@pytest.mark.parametrize(("img", "p0", "window", "grids"), [(224, 4, 7, [28, 14, 7, 7]), (64, 2, 4, [16, 8, 4, 4]),
                                                            (32, 1, 4, [16, 8, 4, 4]), (64, 4, 2, [8, 4, 2, 2])])
def test_tap_grids_match_target_cells(img, p0, window, grids):
    m = LocalMIMSwin(img_size=img, patch_size=p0, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                     window_size=window, decoder_dim=16, target="pixel")
    assert m.tap_grids == grids
    assert [img // c for c in m.target_cells] == grids  # S / c_k = tap grid (method §14.2)
    assert m.target_cells == [2 * p0, 4 * p0, 8 * p0, 8 * p0]


def _nano(**kw):
    torch.manual_seed(0)
    return create("localmim_swin_nano_p2_64", **kw)


def test_small_variant_shapes():
    m = create("localmim_swin_tiny_p2_64", depths=(2, 2, 2, 2))
    assert (m.img_size, m.patch_size, m.grid, m.target_cells, m.hog_nbins) == (64, 2, 4, [4, 8, 16, 16], 9)
    visible = (~m.draw_mask(0.75)).nonzero()[:, 0]
    assert visible.numel() == 4  # 16 cells: 16 - max(1, floor(16 * 0.25)) = 12 masked
    with torch.no_grad():
        taps = m.encoder(torch.randn(2, 3, 64, 64), visible)
    assert [tuple(t.shape) for t in taps] == [(2, 64, 192), (2, 16, 384), (2, 4, 768), (2, 4, 768)]
    assert [(s.blocks[1].window_size[0], s.blocks[1].shift_size[0]) for s in m.encoder.layers] == [
        (4, 2), (4, 2), (4, 2), (4, 0)]


def test_loss_weights_and_raster_order():
    # independent check of the per-tap loss: only positions whose (row // side, col // side) cell is masked count
    m = _nano(target="pixel")
    cell_mask = draw_cell_mask(16, 0.75, generator=torch.Generator().manual_seed(3))
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    targets = [torch.randn(2, g * g, f) for g, f in zip(m.tap_grids, m.target_dims, strict=True)]
    cap = _Capture(m)
    with torch.no_grad():
        loss, parts, mask = m(x, targets=targets, cell_mask=cell_mask)
    cap.close()
    masked_cells = set(cell_mask.nonzero()[:, 0].tolist())
    total = 0.0
    for k, (g, pred, tgt) in enumerate(zip(m.tap_grids, cap.preds, targets, strict=True)):
        side = g // 4
        sel = [y * g + x for y in range(g) for x in range(g) if (y // side) * 4 + x // side in masked_cells]
        assert len(sel) == len(masked_cells) * side * side  # weight sums 16, 4, 1, 1 x masked cells
        expected = (pred[:, sel] - tgt[:, sel]).double().pow(2).mean()
        torch.testing.assert_close(parts[f"tap{k + 1}"].double(), expected, rtol=1e-5, atol=1e-7)
        total += float(expected)
    assert abs(float(loss) - total) < 1e-4
    assert tuple(mask.shape) == (2, 16) and torch.equal(mask[0].bool(), cell_mask)


def test_decoder_places_visible_tokens_in_raster_order():
    # the restore + block->raster index must put visible token j (block order) at its true raster position
    m = _nano(target="pixel")
    cell_mask = draw_cell_mask(16, 0.5, generator=torch.Generator().manual_seed(4))
    visible = (~cell_mask).nonzero()[:, 0].tolist()
    for side in (8, 4, 2, 1):
        fill = m._fill_index(cell_mask, side)
        order = block_order(visible, 4, side)
        n_vis, g = len(order), 4 * side
        for j, (y, x) in enumerate(order):
            assert int(fill[y * g + x]) == j
        assert sorted(fill.tolist()) == list(range(g * g)) and int((fill >= n_vis).sum()) == g * g - n_vis


def test_mae_mode_single_top_decoder():
    m = create("mae_swin_nano_p2_64")
    assert m.loss_names == ["top"] and len(m.decoders) == 1 and m.target_cells == [16]
    cap = _Capture(m)
    loss, parts, _ = m(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    cap.close()
    assert list(parts) == ["top"] and tuple(cap.preds[0].shape) == (2, 16, 3 * 16 * 16)
    loss.backward()
    assert m.encoder.layers[0].blocks[0].attn.qkv.weight.grad is not None


def test_computed_targets_shapes():
    m = _nano()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert [tuple(t.shape) for t in m.compute_targets(x)] == [(2, 256, 27), (2, 64, 27), (2, 16, 27), (2, 16, 27)]
    m = _nano(target="pixel")
    assert [tuple(t.shape) for t in m.compute_targets(x)] == [(2, 256, 48), (2, 64, 192), (2, 16, 768),
                                                              (2, 16, 768)]


@pytest.mark.parametrize("target", ["hog", "pixel"])
def test_overfits_fixed_batch(target):
    torch.manual_seed(0)
    m = LocalMIMSwin(img_size=32, patch_size=1, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                     window_size=4, decoder_dim=32, target=target, hog_nbins=9, hog_bias=False)
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # smooth image, learnable pixels
    x = (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 255).round().to(torch.uint8)
    cell_mask = draw_cell_mask(16, 0.75, generator=torch.Generator().manual_seed(0))
    targets = m.compute_targets(x)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, _, _ = m(x, targets=targets, cell_mask=cell_mask)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# ------------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(img_size=60, patch_size=2), "60 must be divisible by 8\\*patch_size=16"),
        (dict(img_size=16, patch_size=2), "G = .* = 1 must be >= 2"),
        (dict(img_size=64, patch_size=2, window_size=6), "resolution 32 > window 6"),
        (dict(num_heads=(3, 2, 4, 8)), "width 32 not divisible by 3 heads"),
        (dict(decoder_dim=20), "decoder_dim 20"),
        (dict(target="hug"), "target"),
        (dict(mode="simmim"), "mode"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _nano(**kwargs)


def test_bad_input_raises():
    m = _nano(target="pixel", reference_mask_count=True)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 64, 64\], got \(1, 3, 32, 32\)"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    m2 = LocalMIMSwin(img_size=32, patch_size=2, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                      window_size=2, decoder_dim=16, target="pixel", reference_mask_count=True)
    with pytest.raises(ValueError, match="masks 4 of 4 cells"):
        m2(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), mask_ratio=0.75)
    with pytest.raises(ValueError, match="every cell"):
        m2(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), cell_mask=torch.ones(4, dtype=torch.bool))


def test_registered_names():
    from localmim.models import list_models

    names = set(list_models())
    for arch in ("tiny", "base", "large", "tiny_p2_64", "nano_p2_64"):
        assert {f"localmim_swin_{arch}", f"mae_swin_{arch}"} <= names
    assert create("localmim_swin_tiny_p2_64").encoder.tap_grids == (16, 8, 4, 4)


def test_bf16_autocast_runs():
    m = _nano()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts, _ = m(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("encoder.layers.0"))

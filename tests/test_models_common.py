"""The building blocks of the pre-training models (localmim/models/common.py) against NumPy references: sin-cos
position embedding (method §2.9), random masking (§2.1), mask resizing and weights (§2.4), the mask-weighted MSE
(§2.5) and the scale heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localmim.models import common
from tests.vit_reference import np_masked_mse, np_resize_mask, np_sincos

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("h,w,dim,cls", [(4, 4, 16, True), (3, 5, 8, False), (14, 14, 64, True)])
def test_sincos_matches_numpy(h, w, dim, cls):
    got = common.sincos_pos_embed_2d(h, w, dim, cls_token=cls).double().numpy()
    ref = np_sincos(h, w, dim)
    if cls:
        assert np.all(got[0] == 0)
        got = got[1:]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_sincos_rejects_bad_width():
    with pytest.raises(ValueError, match="30"):
        common.sincos_pos_embed_2d(4, 4, 30)


@pytest.mark.parametrize("n,r,keep", [(196, 0.75, 49), (16, 0.75, 4), (64, 0.75, 16), (4, 0.9, 1), (16, 0.0, 16)])
def test_random_masking_counts(n, r, keep):
    ids_keep, ids_restore, mask = common.random_masking(8, n, r, generator=torch.Generator().manual_seed(0))
    assert ids_keep.shape == (8, keep) and ids_restore.shape == (8, n) and mask.shape == (8, n)
    assert torch.all(mask.sum(1) == n - keep)
    for b in range(8):
        # kept ids are exactly the visible positions; ids_restore inverts [kept..., masked...] to raster order
        assert set(ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
        assert sorted(ids_restore[b].tolist()) == list(range(n))
        assert torch.all(ids_restore[b][ids_keep[b]] == torch.arange(keep))


def test_random_masking_differs_per_sample_and_is_seeded():
    _, _, m1 = common.random_masking(6, 64, 0.75, generator=torch.Generator().manual_seed(3))
    _, _, m2 = common.random_masking(6, 64, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)
    assert len({tuple(row.tolist()) for row in m1}) == 6


def test_random_masking_rejects_bad_ratio():
    with pytest.raises(ValueError, match="1.0"):
        common.random_masking(2, 16, 1.0)


@pytest.mark.parametrize("scale", [4, 2, 1, 0.5, 3])
def test_resize_mask_matches_numpy(scale):
    m = (torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    got = common.resize_mask(m, scale).numpy()
    np.testing.assert_allclose(got, np_resize_mask(m.numpy().astype(np.float64), scale), atol=1e-7)


def test_mask_weight_sums_spec15():
    """method §15: sums 16, 4, 1, 1/4 times the patch mask; times c_k^2 all equal the masked pixel area."""
    _, _, mask = common.random_masking(5, 196, 0.75, generator=torch.Generator().manual_seed(2))
    grid = mask.view(5, 14, 14)
    m_sum = mask.sum(1)
    p = 16
    for s, factor in [(4, 16), (2, 4), (1, 1), (0.5, 0.25)]:
        w = common.resize_mask(grid, s)
        assert torch.allclose(w.sum(1), factor * m_sum)
        cell = p / s
        assert torch.allclose(w.sum(1) * cell**2, m_sum * p**2)
    half = common.resize_mask(grid, 0.5)
    assert set(half.unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert ((half > 0) & (half < 1)).any()  # fractional weights are kept (method §13.15)


def test_masked_mse_matches_numpy_and_batch_normaliser():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(3, 10, 5, generator=g), torch.randn(3, 10, 5, generator=g)
    w = torch.rand(3, 10, generator=g) * (torch.rand(3, 10, generator=g) > 0.3)
    w[0] = 0  # a sample without masked positions must not change the normaliser of the others
    got = common.masked_mse(pred, target, w).item()
    ref = np_masked_mse(pred.double().numpy(), target.double().numpy(), w.double().numpy())
    assert got == pytest.approx(ref, rel=1e-5)
    assert common.masked_mse(pred, pred.clone(), w).item() == 0.0


def test_masked_mse_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        common.masked_mse(torch.zeros(2, 4, 3), torch.zeros(2, 5, 3), torch.zeros(2, 4))


def test_scale_head_shapes_spec26():
    """Intermediate shapes of the four heads for d_dec=256, g=14, nb=9 (method §2.6)."""
    want = {
        4: [(1, 128, 28, 28), (1, 128, 28, 28), (1, 128, 28, 28), (1, 64, 56, 56), (1, 27, 56, 56)],
        2: [(1, 128, 28, 28), (1, 27, 28, 28)],
        1: [(1, 27, 14, 14)],
        0.5: [(1, 256, 7, 7), (1, 27, 7, 7)],
    }
    for s, shapes in want.items():
        head = common.build_scale_head(256, 27, s)
        seen = []
        x = torch.zeros(1, 256, 14, 14)
        for layer in head:
            x = layer(x)
            seen.append(tuple(x.shape))
        assert seen == shapes, s
    assert isinstance(common.build_scale_head(256, 27, 4)[1], torch.nn.LayerNorm)  # LN2d between the TConvs

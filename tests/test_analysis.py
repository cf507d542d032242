"""Per-layer analysis (method §10.2) and the weighted kNN monitor, each against an independent float64 NumPy
computation written from the definitions; the probe on features with a planted linear signal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localmim.eval.analysis import (
    attention_distance,
    attention_nmi,
    attention_probs,
    layer_outputs,
    per_layer_scores,
    probe_top1,
)
from localmim.eval.knn import knn_predict, knn_top1


def nmi_numpy(a: np.ndarray) -> float:
    """Park et al.'s NMI of one attention map (method §10.2), float64, loops over queries and keys."""
    a = a.astype(np.float64) + 1e-8
    a = a / a.sum(1, keepdims=True)
    n = a.shape[0]
    pk = np.array([sum(a[q, k] for q in range(n)) / n for k in range(n)])
    mi = sum(a[q, k] / n * math.log(a[q, k] / pk[k]) for q in range(n) for k in range(n))
    hk = -sum(p * math.log(p) for p in pk)
    return mi / math.sqrt(math.log(n) * hk)


def test_nmi_uniform_is_zero_one_hot_is_one_and_matches_numpy():
    n = 9
    uniform = torch.full((n, n), 1.0 / n)
    perm = torch.eye(n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]  # distinct one-hot keys
    same_key = torch.zeros(n, n)
    same_key[:, 3] = 1.0  # every query the same key: collapse, NMI ~ 0
    assert attention_nmi(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_nmi(perm).item() == pytest.approx(1.0, abs=1e-5)
    assert nmi_numpy(perm.numpy()) == pytest.approx(1.0, abs=1e-5)
    assert attention_nmi(same_key).item() == pytest.approx(nmi_numpy(same_key.numpy()), abs=1e-9)
    assert attention_nmi(same_key).item() < 1e-3
    g = torch.Generator().manual_seed(1)
    maps = (torch.randn(2, 3, n, n, generator=g) * 2).softmax(-1)  # [B, H, N, N]
    got = attention_nmi(maps)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    want = np.array([[nmi_numpy(maps[b, h].numpy()) for h in range(3)] for b in range(2)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_attention_distance_on_known_maps():
    # 2x2 grid, patch 8: uniform attention; from each query the distances are 0, 8, 8, 8*sqrt(2)
    uniform = torch.full((4, 4), 0.25)
    want = (0 + 8 + 8 + 8 * math.sqrt(2)) / 4
    assert attention_distance(uniform, (2, 2), 8).item() == pytest.approx(want, rel=1e-7)
    # 3x4 grid, patch 16: every query attends to the patch 2 rows down (wrapping), written out by hand
    gh, gw = 3, 4
    a = np.zeros((gh * gw, gh * gw))
    dist = []
    for r in range(gh):
        for c in range(gw):
            r2 = (r + 2) % gh
            a[r * gw + c, r2 * gw + c] = 1.0
            dist.append(16 * abs(r2 - r))
    got = attention_distance(torch.from_numpy(a), (gh, gw), 16).item()
    assert got == pytest.approx(np.mean(dist), rel=1e-6)
    assert attention_distance(torch.eye(12), (3, 4), 16).item() == pytest.approx(0.0, abs=1e-5)


def knn_numpy(bank, bank_y, q, num_classes, k, t):
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = np.zeros((len(q), num_classes))
    for i in range(len(q)):
        sims = bn @ qn[i]
        for j in np.argsort(-sims, kind="stable")[:k]:
            out[i, bank_y[j]] += math.exp(sims[j] / t)
    return out


def test_knn_matches_numpy_weighted_votes():
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(50, 6)), rng.normal(size=(13, 6))
    y = rng.integers(0, 4, 50)
    got = knn_predict(torch.from_numpy(bank).float(), torch.from_numpy(y), torch.from_numpy(q).float(), 4, k=20,
                      temperature=0.07, chunk=5)
    want = knn_numpy(bank, y, q, 4, 20, 0.07)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    qy = rng.integers(0, 4, 13)
    acc = knn_top1(torch.from_numpy(bank).float(), torch.from_numpy(y), torch.from_numpy(q).float(),
                   torch.from_numpy(qy), 4)
    assert acc == pytest.approx(100 * np.mean(want.argmax(1) == qy))
    with pytest.raises(ValueError, match="labels"):
        knn_predict(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 2), 2)


def test_per_layer_probe_finds_the_planted_linear_signal():
    g = torch.Generator().manual_seed(0)
    n, d, c = 600, 16, 4
    w = torch.randn(d, c, generator=g)
    signal = torch.randn(n, d, generator=g)
    y = (signal @ w).argmax(1)  # labels are a linear function of layer 2's features only
    layers = [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 5 + 3, signal * 7 - 2,
              torch.randn(n, 32, generator=g)]
    tr, va = slice(0, 400), slice(400, n)
    res = per_layer_scores([x[tr] for x in layers], y[tr], [x[va] for x in layers], y[va], c, probe_steps=200)
    probe = res["probe_top1"]
    assert probe[2] >= 90.0, probe
    assert all(p < 45.0 for i, p in enumerate(probe) if i != 2), probe  # chance 25%
    assert int(np.argmax(res["knn_top1"])) == 2
    assert probe_top1(layers[2][tr], y[tr], layers[2][va], y[va], c) == pytest.approx(probe[2], abs=3.0)


def test_layer_outputs_recompute_timm_attention():
    """Hooked attention equals timm's own non-fused attention; features are the mean patch tokens of each block."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                            num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    out = layer_outputs(vit, x)
    assert len(out.feats) == len(out.nmi) == len(out.dist) == 3
    assert out.nmi[0].shape == (2, 2) and out.feats[0].shape == (2, 32)
    with torch.no_grad():
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        blk = vit.blocks[0]
        h = blk.norm1(t)
        a = blk.attn
        qkv = a.qkv(h).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        ref = (qkv[0] * a.scale @ qkv[1].transpose(-2, -1)).softmax(-1)  # [B, H, T, T]
        torch.testing.assert_close(attention_probs(a, h), ref)
        patch = ref[..., 1:, 1:].double().numpy()
        want = [[nmi_numpy(patch[b, hh]) for hh in range(2)] for b in range(2)]
        np.testing.assert_allclose(out.nmi[0].numpy(), want, rtol=1e-5)
        y = blk(t)
        torch.testing.assert_close(out.feats[0], y[:, 1:].mean(1))


def test_layer_outputs_swin_gives_per_block_features_and_no_attention_measures():
    import timm

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, embed_dim=16, depths=(2, 1),
                             num_heads=(1, 2), window_size=4, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    out = layer_outputs(swin, x)
    assert [f.shape for f in out.feats] == [(2, 16), (2, 16), (2, 32)] and out.nmi == [] and out.dist == []
    with torch.no_grad():
        y = swin.layers[1](swin.layers[0](swin.patch_embed(x)))  # [B, H, W, C] output of the last block
    torch.testing.assert_close(out.feats[-1], y.mean((1, 2)))

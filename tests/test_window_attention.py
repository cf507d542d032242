"""ViTDet windowed attention (method §9.2): checked against the plain timm block run on each window by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import Block

from localmim.models.window_attention import (
    WindowedBlock,
    set_grid,
    vitdet_global_blocks,
    window_blocks,
    window_partition,
    window_unpartition,
)


def _block(dim: int = 16) -> Block:
    torch.manual_seed(0)
    blk = Block(dim, num_heads=2, mlp_ratio=2.0, qkv_bias=True).eval()
    for p in blk.parameters():  # non-trivial norms/biases, so a wrong token/window order shows
        p.data.normal_(0, 0.3)
    return blk


def test_partition_roundtrip_pads_and_crops():
    x = torch.randn(2, 5, 7, 3)  # [B, H, W, C]; w = 3 pads to 6 x 9
    windows, padded = window_partition(x, 3)
    assert padded == (6, 9) and windows.shape == (2 * 2 * 3, 9, 3)
    assert torch.equal(windows[0].reshape(3, 3, 3), x[0, :3, :3])  # first window = top-left 3x3 of image 0
    assert torch.equal(windows[5].reshape(3, 3, 3)[:2, :1], x[0, 3:5, 6:7])  # last window of image 0, padded
    assert torch.equal(windows[5].reshape(3, 3, 3)[2], torch.zeros(3, 3))
    assert torch.equal(window_unpartition(windows, 3, padded, (5, 7)), x)


def test_windowed_block_equals_the_block_run_on_each_window():
    """Grid 4x6, window 2, one cls token: every 2x2 window through the plain block gives the windowed block's grid
    tokens; the cls token through the plain block alone gives its output."""
    blk, (h, w), win = _block(), (4, 6), 2
    x = torch.randn(2, 1 + h * w, 16)
    wb = WindowedBlock(copy.deepcopy(blk), win, num_prefix_tokens=1).eval()
    wb.grid = (h, w)
    with torch.no_grad():
        out = wb(x)
        grid_in, grid_out = x[:, 1:].reshape(2, h, w, 16), out[:, 1:].reshape(2, h, w, 16)
        for i in range(0, h, win):
            for j in range(0, w, win):
                ref = blk(grid_in[:, i:i + win, j:j + win].reshape(2, win * win, 16))
                torch.testing.assert_close(grid_out[:, i:i + win, j:j + win].reshape(2, win * win, 16), ref)
        torch.testing.assert_close(out[:, :1], blk(x[:, :1]))


def test_one_window_covering_the_grid_is_global_attention():
    blk, (h, w) = _block(), (3, 3)
    x = torch.randn(1, h * w, 16)
    wb = WindowedBlock(copy.deepcopy(blk), 3, num_prefix_tokens=0).eval()
    wb.grid = (h, w)
    with torch.no_grad():
        torch.testing.assert_close(wb(x), blk(x))


def test_window_blocks_keeps_parameter_names_and_vitdet_globals():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=12, dynamic_img_size=True)
    names = [n for n, _ in vit.named_parameters()]
    assert vitdet_global_blocks(12) == [2, 5, 8, 11] and vitdet_global_blocks(4) == [0, 1, 2, 3]
    assert window_blocks(vit, 3) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert [n for n, _ in vit.named_parameters()] == names
    with pytest.raises(RuntimeError, match="grid is not set"):
        vit(torch.randn(1, 3, 64, 64))
    set_grid(vit, (5, 5))  # 80 px / 16; window 3 pads to 6 x 6
    assert vit.forward_features(torch.randn(1, 3, 80, 80)).shape == (1, 26, 192)
    with pytest.raises(ValueError, match="outside"):
        window_blocks(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2), 3, [5])

"""ViTDet windowed attention (method §9.2): checked against the plain timm block run on each window by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import Block

from localmim.models.window_attention import WindowedBlock, set_grid, vitdet_global_blocks, window_blocks


def _block(dim: int = 16) -> Block:
    torch.manual_seed(0)
    blk = Block(dim, num_heads=2, mlp_ratio=2.0, qkv_bias=True).eval()
    for p in blk.parameters():  # non-trivial norms/biases, so a wrong token/window order shows
        p.data.normal_(0, 0.3)
    return blk


def test_padded_grid_matches_vitdet_padding_after_norm1():
    """Grid 5x7, window 3: the grid is zero-padded to 6x9 after ``norm1``, so every window attends over its real
    tokens plus zero tokens; checked window by window with the block's own norm/attention/MLP."""
    blk, (h, w), win = _block(), (5, 7), 3
    x = torch.randn(2, h * w, 16)
    wb = WindowedBlock(copy.deepcopy(blk), win, num_prefix_tokens=0).eval()
    wb.grid = (h, w)
    with torch.no_grad():
        y = torch.zeros(2, 6, 9, 16)
        y[:, :h, :w] = blk.norm1(x).reshape(2, h, w, 16)
        att = torch.zeros_like(y)
        for i in range(0, 6, win):
            for j in range(0, 9, win):
                att[:, i:i + win, j:j + win] = blk.attn(y[:, i:i + win, j:j + win].reshape(2, win * win, 16)).reshape(
                    2, win, win, 16)
        ref = x + blk.ls1(att[:, :h, :w].reshape(2, h * w, 16))
        ref = ref + blk.ls2(blk.mlp(blk.norm2(ref)))
        torch.testing.assert_close(wb(x), ref)


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

"""Swin flows through the pretrain and finetune stages with nothing but params changed (issue: Swin backbone)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from classify_data import eval_images, make_shards
from conftest import ROOT, run_cli


def test_swin_pretrain_then_finetune_through_params_only(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    make_shards(tmp_path / "shards", "train", per_class=8, size=48)
    make_shards(tmp_path / "shards", "val", per_class=4, size=48, seed=1)
    common = ["--set", "pretrain.model=localmim_swin_nano_p2_64", "--set", "pretrain.input_size=64",
              "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=8", "--set", "pretrain.global_batch=8",
              "--set", "pretrain.num_workers=1"]  # fmt: skip
    run_cli("pretrain", "--shards", "shards/train", "--out", "pre", "--ckpt-dir", "ck", "--metrics", "m/pre.json",
            "--no-progress", *common, cwd=tmp_path, check=True, LOCALMIM_TRACKING="0")  # fmt: skip
    desc = json.loads((tmp_path / "pre" / "encoder.json").read_text())
    assert desc["timm_name"] == "swin_nano_patch2_window4_64"
    # The exported encoder is a plain timm Swin: every key loads except the classifier head and timm's per-token
    # final norm (method §8.2 fine-tunes with a fresh LayerNorm after pooling instead).
    net = timm.models.SwinTransformer(**desc["timm_kwargs"])
    res = net.load_state_dict(torch.load(tmp_path / "pre" / "encoder.pt", weights_only=True), strict=False)
    assert not res.unexpected_keys and set(res.missing_keys) == {"norm.weight", "norm.bias", "head.fc.weight",
                                                                  "head.fc.bias"}

    run_cli("finetune", "--encoder", "pre", "--train", "shards/train", "--val", "shards/val", "--out", "ft",
            "--ckpt-dir", "ckf", "--metrics", "m/ft.json", "--set", "finetune.epochs=1", "--set",
            "finetune.batch_size=8", "--set", "finetune.global_batch=8",
            "--set", "finetune.num_workers=1", cwd=tmp_path, check=True,
            LOCALMIM_TRACKING="0")  # fmt: skip
    metrics = json.loads((tmp_path / "m" / "ft.json").read_text())
    assert metrics["epochs"] == 1 and metrics["val_samples"] == 16
    # the reported top-1 is the written classifier's: plain timm + the test's own eval transform reproduce it
    from localmim.models.encoder_io import create_timm_model

    info = json.loads((tmp_path / "ft" / "model.json").read_text())["spec"]
    assert info["head"] == "pool_norm"
    model = create_timm_model(info["timm_name"], info["head"], **info["timm_kwargs"]).eval()
    model.load_state_dict(torch.load(tmp_path / "ft" / "best.pt", weights_only=True))
    x, y = eval_images(tmp_path / "shards" / "val", 64)
    with torch.no_grad():
        top1 = 100.0 * (model(x).argmax(1) == y).double().mean().item()
    assert top1 == pytest.approx(metrics["best_top1"], abs=1e-9)

"""Swin flows through the pretrain and finetune stages with nothing but params changed (issue: Swin backbone)."""

from __future__ import annotations

import json

import timm
import torch
from classify_data import make_shards
from conftest import ROOT, run_cli


def test_swin_pretrain_then_finetune_through_params_only(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    make_shards(tmp_path / "shards", "train", per_class=8, size=48)
    make_shards(tmp_path / "shards", "val", per_class=4, size=48, seed=1)
    common = ["--set", "pretrain.model=localmim_swin_nano_p2_64", "--set", "pretrain.epochs=1",
              "--set", "pretrain.batch_size=8", "--set", "pretrain.num_workers=1"]  # fmt: skip
    run_cli("pretrain", "--shards", "shards/train", "--out", "pre", "--ckpt-dir", "ck", "--metrics", "m/pre.json",
            "--no-progress", *common, cwd=tmp_path, check=True, LOCALMIM_TRACKING="0")  # fmt: skip
    desc = json.loads((tmp_path / "pre" / "encoder.json").read_text())
    assert desc["timm_name"].startswith("swin")
    # The exported encoder is a plain timm Swin: every key loads except the classifier head.
    net = timm.create_model(desc["timm_name"], pretrained=False, **desc["timm_kwargs"])
    res = net.load_state_dict(torch.load(tmp_path / "pre" / "encoder.pt", weights_only=True), strict=False)
    assert not res.unexpected_keys and all(k.startswith("head") for k in res.missing_keys)

    run_cli("finetune", "--encoder", "pre", "--train", "shards/train", "--val", "shards/val", "--out", "ft",
            "--ckpt-dir", "ckf", "--metrics", "m/ft.json", "--set", "finetune.epochs=1", "--set",
            "finetune.batch_size=8", "--set", "finetune.num_workers=1", cwd=tmp_path, check=True,
            LOCALMIM_TRACKING="0")  # fmt: skip
    metrics = json.loads((tmp_path / "m" / "ft.json").read_text())
    assert 0.0 <= metrics["top1"] <= 100.0 and metrics["epochs"] == 1

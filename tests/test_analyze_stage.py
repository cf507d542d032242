"""`localmim analyze` through the CLI on a tiny shard layout: pretrain (micro ViT, 1 epoch, kNN monitor on) ->
analyze; per-block values in the metrics file and in MLflow (step = block), PNGs written, reconstructions drawn
from the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from classify_data import make_shards
from conftest import ROOT, run_cli
from PIL import Image


def _uniform_attention(side: int, patch: int) -> tuple[float, float]:
    """NMI and mean attention distance (px) of attention spread uniformly over a ``side x side`` patch grid, in
    float64 from the definitions (method §10.2): A[q, k] = 1/N, so p(k) = 1/N and I(Q; K) = 0."""
    n = side * side
    a = np.full((n, n), 1.0 / n)
    pk = a.mean(0)
    mi = float((a * np.log(a / pk[None])).sum() / n)
    nmi = mi / np.sqrt(np.log(n) * -(pk * np.log(pk)).sum())
    pos = np.array([(y, x) for y in range(side) for x in range(side)], np.float64) * patch
    dist = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))  # [N, N]
    return nmi, float((a * dist).sum(1).mean())


def test_analyze_stage_end_to_end(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    make_shards(tmp_path / "shards", "train", per_class=8, size=40)
    make_shards(tmp_path / "shards", "val", per_class=4, size=40, seed=1)
    run_cli("pretrain", "--shards", "shards/train", "--out", "pre", "--ckpt-dir", "ck", "--metrics", "m/pre.json",
            "--no-progress", "--set", "pretrain.model=localmim_vit_micro_patch8", "--set", "pretrain.input_size=32",
            "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=8", "--set", "pretrain.global_batch=8",
            "--set", "pretrain.num_workers=0",
            "--set", "pretrain.knn_every=1", "--set", "pretrain.knn_train=20", cwd=tmp_path, check=True,
            LOCALMIM_TRACKING="0")  # fmt: skip
    knn = json.loads((tmp_path / "pre" / "knn.json").read_text())  # the kNN monitor ran after the one epoch
    chance = 100 / 4  # make_shards: 4 balanced classes (one palette colour each: easy, measured 93.75 after 1 epoch)
    assert [r["epoch"] for r in knn] == [1] and knn[0]["knn_top1"] >= 2 * chance
    assert json.loads((tmp_path / "m" / "pre.json").read_text())["knn_top1"] == knn[0]["knn_top1"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = run_cli("analyze", "--encoder", "pre", "--train", "shards/train", "--val", "shards/val", "--out", "an",
                "--metrics", "m/an.json", "--plots", "m/an.csv", "--set", "analyze.attn_images=6",
                "--set", "analyze.batch_size=4", "--set", "analyze.num_workers=0", "--set", "analyze.recon_images=2",
                cwd=tmp_path, MLFLOW_TRACKING_URI=uri)  # fmt: skip
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "m" / "an.json").read_text())
    doc = json.loads((tmp_path / "an" / "analyze.json").read_text())
    per = doc["per_layer"]
    assert {len(v) for v in per.values()} == {4}  # micro ViT: 4 blocks
    assert doc["taps"] == [0, 1, 2, 3]
    csv = (tmp_path / "m" / "an.csv").read_text().splitlines()
    assert csv[0] == "block,probe_top1,knn_top1,attn_nmi,attn_distance_px" and len(csv) == 5
    assert [float(r.split(",")[3]) for r in csv[1:]] == pytest.approx(per["attn_nmi"], rel=1e-5)
    # against baselines that could win (measured: probe and kNN 100 in every block; NMI 0.017, 0.009, 0.006,
    # 0.005; distance 15.9-16.1 px): chance top-1, and attention spread uniformly over the 4 x 4 patch grid
    assert all(v >= 3 * chance for v in per["probe_top1"] + per["knn_top1"]), per
    uniform_nmi, uniform_dist = _uniform_attention(4, 8)
    assert uniform_nmi == pytest.approx(0.0, abs=1e-12)
    assert all(v > uniform_nmi + 1e-3 for v in per["attn_nmi"]), per["attn_nmi"]  # keys depend on the query
    # one epoch from random init leaves the attention nearly uniform in space: its mean distance is the uniform one
    assert per["attn_distance_px"] == pytest.approx([uniform_dist] * 4, abs=1.0)
    assert m["probe_top1_last"] == per["probe_top1"][-1] and m["chance_top1"] == chance
    assert doc["num_train"] == 32 and doc["num_val"] == 16 and doc["num_attn_images"] == 6
    assert doc["reconstructions"].startswith("2 images, taps tap1, tap2, tap3, tap4")
    for name in ("layers.png", "reconstructions.png"):
        assert np.asarray(Image.open(tmp_path / "an" / name)).ndim == 3

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
    hist = client.get_metric_history(run.info.run_id, "layer_attn_nmi")
    assert sorted(h.step for h in hist) == [1, 2, 3, 4]
    assert [h.value for h in sorted(hist, key=lambda h: h.step)] == per["attn_nmi"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "analyze")}
    assert {"analyze/layers.png", "analyze/reconstructions.png", "analyze/analyze.json"} <= arts

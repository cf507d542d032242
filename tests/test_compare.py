"""Comparing runs end to end: two real pipeline invocations (stage CLIs, tiny settings) into one sqlite store.

Pipeline A runs every stage with ``pretrain.mask_ratio: 0.75``; pipeline B, in the same workspace (as a second
``dvc exp run`` would), reruns only pretrain -> finetune -> linprobe with 0.6 and reuses A's data stages. Checked
against what the test itself set and against MLflow's own API: lineage tags/params, registry, DVC plots, and
``localmim compare`` (groups, differing param, plots).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import BIN, ROOT, cli_env, run_cli

pytestmark = pytest.mark.slow

TINY = {
    "synth": {"num_classes": 4, "train_per_class": 4, "val_per_class": 2, "seg_train": 2, "seg_val": 1,
              "coco_train": 2, "coco_val": 1, "min_side": 40, "max_side": 72},
    "shard": {"max_samples_per_shard": 16, "workers": 1},
    "pretrain": {"epochs": 1, "warmup_epochs": 0, "global_batch": 8, "batch_size": 8, "num_workers": 0, "log_every": 1},
    "finetune": {"epochs": 2, "warmup_epochs": 0, "global_batch": 8, "batch_size": 8, "num_workers": 0},
    "linprobe": {"epochs": 2, "warmup_epochs": 0, "global_batch": 16, "batch_size": 16, "num_workers": 0},
}  # fmt: skip
DATA_STAGES = [("synth", "data/raw"), ("shard", "data/raw/imagenet/train", "data/shards/train", "--split", "train"),
               ("shard", "data/raw/imagenet/val", "data/shards/val", "--split", "val")]
MODEL_STAGES = [("pretrain", "--no-progress"), ("finetune",), ("linprobe",)]


def _stage(ws, *args, **env):
    p = run_cli(*args, cwd=ws, **env)
    assert p.returncode == 0, f"localmim {' '.join(args)} failed:\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("compare")
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        tree[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    for args in DATA_STAGES + MODEL_STAGES:
        _stage(ws, *args, LOCALMIM_GROUP="group-a")
    for args in MODEL_STAGES:  # B: same workspace, only what the changed param invalidates
        extra = ("--set", "pretrain.mask_ratio=0.6") if args[0] == "pretrain" else ()
        _stage(ws, *args, *extra, LOCALMIM_GROUP="group-b", DVC_EXP_NAME="exp-mask060")
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    return ws


def _runs(stage: str):
    return mlflow.search_runs(experiment_names=["localmim"], filter_string=f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time ASC"])


def test_finetune_runs_find_their_pretraining_run_and_params(ws):
    ft = _runs("finetune")
    assert list(ft["tags.localmim.group"]) == ["group-a", "group-b"]
    assert list(ft["params.pretrain.mask_ratio"]) == ["0.75", "0.6"]  # carried upstream params, as set above
    for _, row in ft.iterrows():
        pt = mlflow.get_run(row["tags.localmim.upstream.pretrain"])
        assert pt.data.tags["stage"] == "pretrain" and pt.data.tags["localmim.group"] == row["tags.localmim.group"]
        assert pt.data.params["mask_ratio"] == row["params.pretrain.mask_ratio"]
        inputs = {d.dataset.name: d for d in mlflow.get_run(row["run_id"]).inputs.dataset_inputs}
        assert set(inputs) == {"data/pretrain", "data/shards/train", "data/shards/val"}
    # the data stages ran once; B references A's runs instead of logging them again
    assert len(_runs("shard_train")) == 1 and len(_runs("synth")) == 1
    assert ft["tags.localmim.upstream.shard_train"].nunique() == 1
    assert list(ft["tags.localmim.dvc_exp"].fillna("")) == ["", "exp-mask060"]
    digests = [{d.dataset.name: d.dataset.digest for d in mlflow.get_run(r).inputs.dataset_inputs}
               for r in ft["run_id"]]
    assert digests[0]["data/shards/train"] == digests[1]["data/shards/train"]  # same data, same digest
    assert digests[0]["data/pretrain"] != digests[1]["data/pretrain"]  # another encoder, another digest


def test_encoders_registered_with_downstream_metrics(ws):
    pt, ft = _runs("pretrain"), _runs("finetune")
    versions = mlflow.MlflowClient().search_model_versions("name = 'encoder-localmim_vit_tiny_patch8'")
    by_run = {v.run_id: v for v in versions}
    assert set(by_run) == set(pt["run_id"])
    for (_, p), (_, f) in zip(pt.iterrows(), ft.iterrows(), strict=True):
        tags = by_run[p["run_id"]].tags
        assert float(tags["final_loss"]) == pytest.approx(p["metrics.final_loss"])
        assert float(tags["finetune.top1"]) == pytest.approx(f["metrics.top1"])


def test_curves_written_for_dvc_and_logged_with_steps(ws):
    pt = _runs("pretrain").iloc[-1]
    history = mlflow.MlflowClient().get_metric_history(pt["run_id"], "loss_tap1")
    lines = (ws / "metrics/curves/pretrain/loss_tap1.tsv").read_text().splitlines()
    assert lines[0] == "step\tloss_tap1"
    rows = [tuple(map(float, r.split("\t"))) for r in lines[1:]]
    assert len(rows) >= 2 and sorted({m.step for m in history}) == [int(s) for s, _ in rows]
    assert [v for _, v in rows] == pytest.approx([m.value for m in sorted(history, key=lambda m: m.step)])
    ft_top1 = (ws / "metrics/curves/finetune/top1.tsv").read_text().splitlines()
    steps = 4 * 4 // 8  # optimizer steps per epoch: synth's 4 classes x 4 train images, finetune's global batch 8
    assert [int(r.split("\t")[0]) for r in ft_top1[1:]] == [steps, 2 * steps]  # one point per epoch, at its last step


def test_dvc_plots_show_writes_html(ws, tmp_path):
    """The generated plot declarations of the stages this workspace ran render (the others' files are absent
    here, and a declared plot without its file is a "failed to load" warning, so they are left out)."""
    env, repo = cli_env(), tmp_path / "plots"
    shutil.copytree(ws / "metrics", repo / "metrics")
    shutil.copy(ws / "params.yaml", repo / "params.yaml")  # dvc.yaml's ${section.key} commands resolve from it
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    ran = {k: v for k, v in stages.items() if k in ("pretrain", "finetune", "linprobe")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": ran}))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True, env=env)
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    (repo / "metrics/curves/pretrain/.snakemake_timestamp").touch()  # what Snakemake leaves in directory() outputs
    p = subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    html = (repo / "dvc_plots" / "index.html").read_text()
    for name in ("loss_tap1", "top1", "lr"):
        assert name in html
    assert "failed to load" not in (p.stdout + p.stderr)


def test_compare_lists_groups_differing_param_and_plots(ws, tmp_path):
    out = tmp_path / "cmp"
    p = run_cli("compare", "--format", "json", "--out", str(out), cwd=ws)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["label"] for r in rows] == ["group-a", "exp-mask060"]  # B is named by its DVC experiment
    assert [r["params"] for r in rows] == [{"pretrain.mask_ratio": "0.75"}, {"pretrain.mask_ratio": "0.6"}]
    ft = _runs("finetune")
    assert [r["metrics"]["finetune.top1"] for r in rows] == pytest.approx(list(ft["metrics.top1"]))
    assert rows[1]["reused"]["shard_train"] == "group-a"
    for name in ("pretrain_loss.png", "eval_curves.png", "headline.png"):
        img = np.asarray(Image.open(out / name).convert("L"), dtype=np.float64)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 5, name  # a real picture, not blank
    md = run_cli("compare", "exp-mask060", "group-a", "--out", str(out), cwd=ws)
    assert md.returncode == 0, md.stderr
    header = md.stdout.splitlines()[0]
    assert "pretrain.mask_ratio" in header and "finetune.top1" in header and "linprobe.top1" in header
    assert "finetune.lr" not in header  # equal params are left out
    one = run_cli("compare", "--experiment", "exp-mask060", "--out", str(out), cwd=ws)
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 3 and "only one pipeline group" in one.stderr


def test_compare_says_when_there_is_nothing_to_compare(ws, tmp_path):
    p = run_cli("compare", "--out", str(tmp_path / "o"), cwd=tmp_path, MLFLOW_TRACKING_URI="")
    assert p.returncode == 1 and "nothing to compare" in p.stderr and "mlflow.db" in p.stderr
    p = run_cli("compare", "no-such-exp", "--out", str(tmp_path / "o"), cwd=ws)
    assert p.returncode == 1 and "no-such-exp" in p.stderr

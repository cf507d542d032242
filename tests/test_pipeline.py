"""The real pipeline tools on the embedded data: Snakemake and DVC run the same DAG and agree.

Runs in temp copies of the repository with tiny params. Slow-ish (a couple of minutes): marked ``slow``.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, cli_env, run_cli

pytestmark = pytest.mark.slow

# Tiny settings for every stage so the whole DAG runs in about a minute on 2 cores.
TINY = {
    "synth": {"num_classes": 10, "train_per_class": 4, "val_per_class": 2, "seg_train": 4, "seg_val": 2,
              "coco_train": 4, "coco_val": 2, "min_side": 40, "max_side": 72},
    "shard": {"max_samples_per_shard": 16, "workers": 2},
    "targets": {"views": 2},
    "pretrain": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "num_workers": 1, "log_every": 1},
    "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "num_workers": 1},
    "linprobe": {"epochs": 2, "warmup_epochs": 0, "batch_size": 16, "num_workers": 1},
    "detect": {"epochs": 1, "image_size": 32, "num_workers": 0, "vis_images": 2},
}  # fmt: skip


def _tiny_params(repo: Path) -> dict:
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        if section in tree:
            tree[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return tree


def _set_param(repo: Path, section: str, key: str, value) -> None:
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    tree[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


def _run(cmd: list[str], cwd: Path) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=cli_env(LOCALMIM_TEST="1"), capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p.stdout + p.stderr


def _shard_hashes(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((repo / "data" / "shards").rglob("*.tar"))
    }


def _downstream(dvc_yaml: dict, changed: set[str]) -> set[str]:
    """Stages that must rerun when ``changed`` stages rerun: everything reachable through deps/outs."""
    stages = dvc_yaml["stages"]

    def outs(s):
        return [next(iter(o)) if isinstance(o, dict) else o for o in stages[s].get("outs", []) + stages[s].get(
            "metrics", [])]

    result = set(changed)
    grew = True
    while grew:
        grew = False
        for name, st in stages.items():
            if name in result:
                continue
            deps = st.get("deps", [])
            if any(d == o or d.startswith(o.rstrip("/") + "/") for s in result for o in outs(s) for d in deps):
                result.add(name)
                grew = True
    return result


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def _git_init(repo: Path) -> None:
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t",
                                                                "commit", "-qm", "init"]):
        _run(cmd, repo)


def test_snakemake_and_dvc_build_the_same_shards(tmp_path):
    from tests.conftest import copy_repo

    smk = copy_repo(tmp_path / "smk")
    dvc = copy_repo(tmp_path / "dvc")
    for repo in (smk, dvc):
        _tiny_params(repo)

    # Snakemake end to end (the default workflow profile is picked up by itself).
    out = _run([str(BIN / "snakemake"), "--cores", "2"], smk)
    assert "Using workflow specific profile profiles/default" in out
    smk_hashes = _shard_hashes(smk)
    assert any("train" in k for k in smk_hashes) and any("val" in k for k in smk_hashes)
    for split in ("train", "val"):
        manifest = yaml.safe_load((smk / f"data/shards/{split}/{split}.json").read_text())
        assert manifest["num_samples"] + manifest["num_skipped"] == manifest["num_found"]

    # A second snakemake run has nothing to do (no mtime trigger; params unchanged).
    out = _run([str(BIN / "snakemake"), "--cores", "2", "-n"], smk)
    assert "Nothing to be done" in out

    # DVC in a git repo: same shards, byte for byte.
    _git_init(dvc)
    out = _run([str(BIN / "dvc"), "repro"], dvc)
    dvc_yaml = yaml.safe_load((dvc / "dvc.yaml").read_text())
    assert _ran(out) == set(dvc_yaml["stages"])
    assert _shard_hashes(dvc) == smk_hashes

    # Changing a shard param reruns the shard stages and what depends on them, nothing upstream.
    _set_param(dvc, "shard", "max_samples_per_shard", 5)
    out = _run([str(BIN / "dvc"), "repro"], dvc)
    assert _ran(out) == _downstream(dvc_yaml, {"shard_train", "shard_val"})
    assert "synth" not in _ran(out)
    assert len(_shard_hashes(dvc)) > len(smk_hashes)

    # Changing the mask ratio reruns pretraining and everything downstream of it, nothing upstream.
    if "pretrain" in dvc_yaml["stages"]:
        _set_param(dvc, "pretrain", "mask_ratio", 0.6)
        out = _run([str(BIN / "dvc"), "repro"], dvc)
        assert _ran(out) == _downstream(dvc_yaml, {"pretrain"})
        assert {"finetune", "linprobe"} <= _ran(out)
        assert not {"synth", "shard_train", "shard_val"} & _ran(out)

    # Every stage run is in MLflow (sqlite store in the repo).
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{dvc / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["localmim"])
    assert set(dvc_yaml["stages"]) <= set(runs["tags.stage"])


def test_unreachable_tracking_server_stops_stage_before_work(repo_copy):
    _tiny_params(repo_copy)
    p = run_cli("synth", "data/raw", cwd=repo_copy, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert p.returncode == 1
    assert "http://127.0.0.1:9" in p.stderr and "unreachable" in p.stderr
    assert not (repo_copy / "data" / "raw").exists()


def test_committed_dag_is_current():
    p = run_cli("dag", "--check")
    assert p.returncode == 0, p.stderr

"""`localmim pull`'s decisions, on hand-written `dvc status --json` / dvc.lock contents (the shapes DVC 3 writes;
tests/test_share.py runs the real tools): which stages are recorded for Snakemake, with which params, in which runs."""

from __future__ import annotations

import json
import os

from localmim.pipeline import pull
from localmim.pipeline.dag import pipeline
from localmim.synth import write_imagenet

SHARD = {"max_samples_per_shard": 16, "max_side": 0}


def _lock(**sections) -> dict:
    """dvc.lock entries: stage -> {params: {params.yaml: {key: value}}}."""
    return {stage: {"params": {"params.yaml": params}} for stage, params in sections.items()}


def test_only_changed_params_and_always_changed_leave_a_stage_restored():
    assert pull.blocking_changes(["always changed", {"changed deps": {"params.yaml": {"shard": "modified"}}}]) == []
    found = pull.blocking_changes([{"changed deps": {"data/views": "deleted", "params.yaml": {"pretrain": "modified"}}},
                                   {"changed outs": {"data/pretrain": "deleted"}}])
    assert found == ["data/views deleted", "changed outs: data/pretrain deleted"]


def test_plan_records_restored_stages_with_the_lock_params():
    nodes = [n for n in pipeline() if n.name in {"shard_train", "shard_val", "targets", "pretrain"}]
    params = {"shard": {**SHARD, "max_samples_per_shard": 5}, "targets": {"views": 2},
              "pretrain": {"data": "online", "epochs": 1, "new_key": 1}}
    lock = _lock(shard_train={"shard": SHARD}, shard_val={"shard": SHARD},
                 targets={"targets": {"views": 2}, "pretrain.data": "online"},
                 pretrain={"pretrain": {"data": "online", "epochs": 1}})
    status = {"shard_train": [{"changed deps": {"params.yaml": {"shard": "modified"}}}],
              "shard_val": [{"changed outs": {"data/shards/val": "deleted"}}]}
    record, stale, skipped = pull.plan(nodes, status, lock, params)
    assert record == ["shard_train", "targets"]  # DAG order
    assert stale == {"shard_train": "shard.max_samples_per_shard"}
    assert skipped["shard_val"] == "DVC: changed outs: data/shards/val deleted"
    # a key added to params.yaml since dvc.lock: a merged config could not say the outputs were made without it
    assert skipped["pretrain"] == "params.yaml has keys dvc.lock lacks: pretrain.new_key"


def test_passes_split_where_the_lock_params_disagree():
    overlays = {"shard_train": {"shard.max_side": 0}, "shard_val": {"shard.max_side": 64},
                "targets": {"targets.views": 2, "pretrain.data": "online"}, "pretrain": {"pretrain.data": "online"}}
    runs = pull.passes(["shard_train", "shard_val", "targets", "pretrain"], overlays)
    assert [r for r, _ in runs] == [["shard_train"], ["shard_val", "targets", "pretrain"]]
    assert runs[1][1] == {"shard.max_side": 64, "targets.views": 2, "pretrain.data": "online"}
    one = pull.passes(["targets", "pretrain"], overlays)
    assert [r for r, _ in one] == [["targets", "pretrain"]]


def test_a_real_dataset_is_recorded_only_while_its_folder_matches_the_manifest(tmp_path, monkeypatch):
    from localmim.data.raw.datasets import state, write_manifest

    root = tmp_path / "imagenet"
    write_imagenet(root, seed=1, num_classes=2, per_class={"train": 2, "val": 1}, min_side=32, max_side=40,
                   quality=90)
    monkeypatch.chdir(tmp_path)
    write_manifest("imagenet", str(root), tmp_path / "data/raw")
    params = {"datasets": {"imagenet": str(root), "fingerprint": "stat"}}
    assert pull.dataset_matches("imagenet", params) is None
    assert pull.dataset_matches("imagenet", {"datasets": {"imagenet": "", "fingerprint": "stat"}}) is None  # embedded
    img = next(root.rglob("*.JPEG"))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # another copy of the folder: other times
    why = pull.dataset_matches("imagenet", params)
    assert why is not None and f"datasets.imagenet={root}" in why
    manifest = json.loads((tmp_path / "data/raw/imagenet.json").read_text())
    assert manifest["fingerprint"] != state("imagenet", str(root))  # the check is the dataset module's own trigger

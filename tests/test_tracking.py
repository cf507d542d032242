"""Real MLflow: a sqlite store, a real `mlflow server` on 127.0.0.1, and failing fast when it is unreachable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from localmim.config.shard import ShardConfig
from localmim.tracking.mlflow_run import StageRun, TrackingError, check_reachable
from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_one_run(uri: str, monkeypatch, artifact: Path) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "localmim-test")
    cfg = ShardConfig(seed=3)
    with StageRun("shard_train", "shard", cfg) as run:
        run.log_metrics({"num_samples": 12, "num_skipped": 1})
        run.log_artifact(artifact)
    return run.run_id


def _check_run(uri: str, run_id: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["localmim-test"], filter_string="tags.stage = 'shard_train'")
    assert list(runs["run_id"]) == [run_id]
    row = runs.iloc[0]
    assert row["metrics.num_samples"] == 12 and row["metrics.num_skipped"] == 1
    assert row["params.seed"] == "3" and row["params.on_bad"] == "skip"
    # the tag is sha256(sorted-key JSON of the section)[:12], recomputed here from the params the run logged
    logged = {k.removeprefix("params."): yaml.safe_load(v) for k, v in row.items() if k.startswith("params.")}
    want = hashlib.sha256(json.dumps(logged, sort_keys=True).encode()).hexdigest()[:12]
    assert row["tags.params_hash"] == want and want != ShardConfig(seed=4).params_hash()
    assert row["tags.git_commit"]
    assert row["status"] == "FINISHED"
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id)]
    assert "manifest.json" in arts


def test_sqlite_store(tmp_path, monkeypatch):
    art = tmp_path / "manifest.json"
    art.write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _log_one_run(uri, monkeypatch, art)
    _check_run(uri, run_id)


def test_failed_stage_marks_run_failed(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "localmim-test")
    with pytest.raises(RuntimeError, match="boom"):
        with StageRun("shard_val", "shard", ShardConfig()):
            raise RuntimeError("boom")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["localmim-test"])
    assert list(runs["status"]) == ["FAILED"]


def test_unreachable_server_fails_fast_naming_uri():
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.time()
    with pytest.raises(TrackingError, match=f"{uri}.*unreachable"):
        check_reachable(uri, timeout=2)
    assert time.time() - t0 < 10  # a refused connection answers at once; not a speed goal, a hang guard
    with pytest.raises(TrackingError, match="does not exist or is not writable"):
        check_reachable("sqlite:////nonexistent-dir/mlflow.db")


@pytest.mark.slow
def test_real_mlflow_server(tmp_path, monkeypatch):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not come up on {uri}")
                time.sleep(0.5)
        art = tmp_path / "manifest.json"
        art.write_text("{}")
        run_id = _log_one_run(uri, monkeypatch, art)
        _check_run(uri, run_id)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


# --- lineage, grouping, reliability -------------------------------------------------------------------------------

_WRITER = """
import sys
from localmim.config.shard import ShardConfig
from localmim.tracking.mlflow_run import StageRun
tag, n_runs, n_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n_runs):
    with StageRun(f"{tag}_{i}", "shard", ShardConfig(seed=i), outputs=[f"out/{tag}/{i}"]) as run:
        for step in range(n_steps):
            run.log_metrics({"loss": step + i / 100, "lr": 0.5}, step=step)
        run.log_metrics({"done": 1.0})
"""


def test_two_pipelines_share_one_sqlite_store_without_losing_anything(tmp_path):
    """Two processes start on a fresh store at once (schema creation race) and log runs and stepped metrics
    concurrently; every run and every metric point must be there."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "concurrent", "OMP_NUM_THREADS": "1"}
    n_runs, n_steps = 4, 20
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, tag, str(n_runs), str(n_steps)], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["concurrent"])
    assert sorted(runs["tags.stage"]) == sorted(f"{t}_{i}" for t in "ab" for i in range(n_runs))
    assert set(runs["status"]) == {"FINISHED"} and (runs["metrics.done"] == 1.0).all()
    client = mlflow.MlflowClient()
    for _, row in runs.iterrows():
        i = int(row["tags.stage"].split("_")[1])
        hist = sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], "loss"))
        assert hist == [(s, s + i / 100) for s in range(n_steps)]


_KILLABLE = """
import sys, time
from localmim.config.shard import ShardConfig
from localmim.tracking.mlflow_run import StageRun
with StageRun("shard_train", "shard", ShardConfig(), outputs=["out"]) as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def test_killed_stage_is_not_left_running(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "localmim-test")
    p = subprocess.Popen([sys.executable, "-c", _KILLABLE], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    killed_id = p.stdout.readline().strip()
    p.kill()  # SIGKILL: no chance to end the run
    p.wait(timeout=60)
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(killed_id).info.status == "RUNNING"
    monkeypatch.chdir(tmp_path)
    with StageRun("shard_train", "shard", ShardConfig(), outputs=["out"]) as run:  # the next start cleans up
        pass
    assert mlflow.get_run(killed_id).info.status == "KILLED"
    assert mlflow.get_run(run.run_id).info.status == "FINISHED"


def test_sigterm_ends_the_run_killed(tmp_path):
    """A stage stopped with SIGTERM (scancel, snakemake on Ctrl-C) marks its own run KILLED on the way out."""
    import mlflow

    (tmp_path / "params.yaml").write_text("synth: {num_classes: 2}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = ("import time, localmim.stages.synth as s, localmim.synth as d\n"
              "d.generate_all = lambda *a, **k: (print('started', flush=True), time.sleep(600))\n"
              "from localmim.cli import main; main(['synth', 'out'])\n")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert p.stdout.readline().strip() == "started"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 128 + signal.SIGTERM
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["localmim"])
    assert list(runs["status"]) == ["KILLED"]


def test_group_is_the_launching_pipeline_process(tmp_path, monkeypatch):
    """Every stage launched by one `snakemake` (or `dvc`) process gets the same group id, another launch another."""
    monkeypatch.delenv("LOCALMIM_GROUP", raising=False)
    fake = tmp_path / "snakemake"
    probe = f"{sys.executable} -c 'from localmim.tracking.lineage import pipeline_group as g; print(*g())'"
    fake.write_text(f"#!/bin/bash\n{probe}\nbash -c \"{probe}\"\n")  # a stage and a stage under a sub-shell
    fake.chmod(0o755)
    first = subprocess.run([str(fake)], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split("\n")
    second = subprocess.run([str(fake)], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split("\n")
    assert first[0] == first[1] and first[0].startswith("snakemake-") and first[0].endswith(" snakemake")
    assert second[0] != first[0]
    alone = subprocess.run(probe, shell=True, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert alone == "None none"
    with_env = subprocess.run(probe, shell=True, capture_output=True, text=True, check=True, cwd=ROOT,
                              env={**os.environ, "LOCALMIM_GROUP": "g7"}).stdout.strip()
    assert with_env == "g7 env"


def test_dataset_digest_follows_content_not_lineage(tmp_path):
    from localmim.tracking.lineage import dataset_digest, write_lineage

    d = tmp_path / "shards"
    d.mkdir()
    (d / "train.json").write_text('{"shards": [{"name": "train-000000.tar", "sha256": "aa"}]}')
    (d / "train-000000.tar").write_bytes(b"x" * 100)
    base = dataset_digest(d)
    write_lineage(d, {"stage": "shard_train", "run_id": "r1"})
    assert dataset_digest(d) == base
    (d / "train.json").write_text('{"shards": [{"name": "train-000000.tar", "sha256": "ab"}]}')
    assert dataset_digest(d) != base


def test_stale_lineage_is_ignored_and_dvc_does_not_hash_it(tmp_path):
    """A lineage record names the contents it was written for: after the directory changed under it (``dvc
    checkout`` of another version leaves the DVC-ignored file behind) it no longer vouches for it. And the
    repository's .dvcignore keeps every lineage file out of DVC's directory hashes (checked with DVC's own
    ignore matcher, not a copy of the pattern)."""
    from dvc.ignore import DvcIgnoreFilter
    from dvc.repo import Repo

    from localmim.tracking.lineage import dataset_digest, find_lineage, write_lineage

    d = tmp_path / "shards"
    d.mkdir()
    (d / "train-000000.tar").write_bytes(b"x" * 100)
    write_lineage(d, {"stage": "shard_train", "run_id": "r1", "output_digest": dataset_digest(d)})
    write_lineage(d, {"stage": "old_format", "run_id": "r0"})  # written before output_digest existed: trusted
    assert {r["run_id"] for r in find_lineage(d / "train-000000.tar")} == {"r1", "r0"}
    (d / "train-000000.tar").write_bytes(b"y" * 100)
    assert {r["run_id"] for r in find_lineage(d)} == {"r0"}

    repo = tmp_path / "repo"
    (repo / "data" / "shards").mkdir(parents=True)
    (repo / ".dvcignore").write_bytes((ROOT / ".dvcignore").read_bytes())
    Repo.init(str(repo), no_scm=True)
    fs = Repo(str(repo)).fs
    ignore = DvcIgnoreFilter(fs, str(repo))
    for name, ignored in (("lineage.shard_train.json", True), (".snakemake_timestamp", True),
                          ("train-000000.tar", False), ("train.json", False)):
        assert ignore.is_ignored_file(str(repo / "data" / "shards" / name)) is ignored, name


_FORKED = """
import multiprocessing, os, signal, time
from localmim.pipeline import stage as base
base._HANDLER_PID.append(os.getpid())
signal.signal(signal.SIGTERM, base._sigterm_to_exit)  # as `execute` installs it
p = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
p.start()
time.sleep(0.5)
p.terminate()
p.join(60)
with multiprocessing.get_context("fork").Pool(2) as pool:  # __exit__ terminates the workers with SIGTERM
    assert pool.map(abs, range(-8, 0)) == list(range(8, 0, -1))
print(p.exitcode)
"""


def test_forked_workers_keep_the_default_sigterm():
    """`Pool.terminate()` stops workers with SIGTERM and expects them to die at once: the stage's handler, which
    forked workers inherit, must act as the default action there (else a worker may hang the stage)."""
    out = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(-signal.SIGTERM)


def test_upstream_encoder_missing_from_the_store_warns_and_finishes(tmp_path, monkeypatch, capsys):
    """The input's lineage names a registered encoder version this store does not hold (made with another
    MLFLOW_TRACKING_URI, or mlflow.db deleted since): the stage finishes and says so; it used to crash at the end."""
    import mlflow

    from localmim.tracking.lineage import write_lineage

    enc = tmp_path / "pretrain"
    enc.mkdir()
    write_lineage(enc, {"run_id": "0" * 32, "stage": "pretrain", "params": {"pretrain.mask_ratio": 0.6},
                        "registered_model": {"name": "encoder-localmim_vit_tiny_patch8", "version": "3"}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "localmim-test")
    with StageRun("linprobe", "linprobe", ShardConfig(), inputs={"encoder": str(enc)}) as run:
        run.finish({"top1": 42.0})
    assert "encoder encoder-localmim_vit_tiny_patch8 version 3 is not in" in capsys.readouterr().err
    mlflow.set_tracking_uri(uri)
    (row,) = mlflow.search_runs(experiment_names=["localmim-test"], output_format="list")
    assert row.info.status == "FINISHED" and row.data.params["pretrain.mask_ratio"] == "0.6"


def test_retry_gives_up_at_once_on_a_final_error_code():
    """Creating a registered model that exists says "already exists", a message `retry` waits out (up to 2 min)
    when two pipelines race; with the error code marked final the caller gets the answer on the first call."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    from localmim.tracking.mlflow_run import retry

    calls = []

    def exists(name):
        calls.append(name)
        raise MlflowException(f"Registered Model (name={name}) already exists.", error_code=RESOURCE_ALREADY_EXISTS)

    with pytest.raises(MlflowException):
        retry(exists, "encoder-x", final_codes=("RESOURCE_ALREADY_EXISTS",))
    assert calls == ["encoder-x"]
    flaky = iter([MlflowException("database is locked"), None])

    def locked_once():
        if (e := next(flaky)) is not None:
            raise e
        return "ok"

    assert retry(locked_once, final_codes=("RESOURCE_ALREADY_EXISTS",)) == "ok"


def test_curves_of_a_resumed_run_keep_the_earlier_points_and_no_times(tmp_path, monkeypatch):
    """Curves are DVC plots: a run resumed mid-way adds to the points before its first step, a run that logged
    nothing (resumed at its end) leaves them, and times/rates never enter them (they differ between equal runs)."""
    from localmim.tracking.mlflow_run import StageRun, read_curves, write_curves

    d = tmp_path / "curves"
    write_curves(d, {"loss": {1: 3.0, 2: 2.0, 3: 1.5}, "lr": {1: 0.1, 3: 0.3}})
    write_curves(d, {"loss": {3: 1.25, 4: 1.0}})  # resumed after step 2: step 3 is logged again
    assert read_curves(d) == {"loss": {1: 3.0, 2: 2.0, 3: 1.25, 4: 1.0}, "lr": {1: 0.1}}
    write_curves(d, {})
    assert read_curves(d)["loss"] == {1: 3.0, 2: 2.0, 3: 1.25, 4: 1.0}
    write_curves(d, {"loss": {0: 9.0}})  # a run from step 0 (new params: no checkpoint resumed) replaces all
    assert read_curves(d) == {"loss": {0: 9.0}}

    monkeypatch.setenv("LOCALMIM_TRACKING", "0")  # rank 0 without MLflow: curves are still kept
    run = StageRun("s", "s", None)
    run.log_metrics({"loss": 1.0, "images_per_s": 50.0, "train_seconds": 3.0, "final_data_wait_frac": 0.1}, step=5)
    assert run.curves == {"loss": {5: 1.0}}

"""Real MLflow: a sqlite store, a real `mlflow server` on 127.0.0.1, and failing fast when it is unreachable."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from localmim.config.shard import ShardConfig
from localmim.stages.tracking import StageRun, TrackingError, check_reachable


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

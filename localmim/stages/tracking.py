"""MLflow tracking for stage runs: one MLflow run per stage invocation.

Default store: ``sqlite:///<cwd>/mlflow.db`` (git-ignored); ``MLFLOW_TRACKING_URI`` overrides it and
``MLFLOW_EXPERIMENT_NAME`` the experiment (default ``localmim``). The store is checked before any work,
so an unreachable server fails the stage at once with a message naming the URI.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from localmim.utils.gitinfo import git_commit

DEFAULT_EXPERIMENT = "localmim"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless the tracking store at ``uri`` can be used (HTTP health check or writable dir)."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered HTTP {r.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it or unset MLFLOW_TRACKING_URI"
            ) from None
        return
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
    elif uri.startswith("file:"):
        parent = Path("/" + uri[len("file:") :].lstrip("/")).parent
    elif "://" not in uri:
        parent = Path(uri).parent
    else:
        return  # other schemes (databricks, ...): let MLflow report problems
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise TrackingError(f"MLflow tracking store {uri}: directory {parent} does not exist or is not writable")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """One MLflow run for one stage invocation; a no-op on non-zero ranks (``enabled=False``).

    Metrics are buffered per call and sent in one batch; ``log_metrics`` never syncs a device
    (callers pass Python numbers they already have on the host).
    """

    def __init__(self, stage: str, section: str, cfg: Any, *, enabled: bool = True, system_metrics: bool = False):
        self.stage, self.section, self.cfg = stage, section, cfg
        self.enabled = enabled and os.environ.get("LOCALMIM_TRACKING", "1") != "0"
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self._mlflow = None
        self.t0 = time.time()

    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        uri = tracking_uri()
        check_reachable(uri)
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
        tags = {"stage": self.stage, "section": self.section, "git_commit": git_commit()}
        if hasattr(self.cfg, "params_hash"):
            tags["params_hash"] = self.cfg.params_hash()
        run = mlflow.start_run(run_name=self.stage, tags=tags, log_system_metrics=self.system_metrics)
        self.run_id = run.info.run_id
        params = _flatten(self.cfg.to_dict()) if hasattr(self.cfg, "to_dict") else {}
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is not None:
            self.log_metrics({"stage_seconds": time.time() - self.t0})
            self._mlflow.end_run(status="FINISHED" if exc_type is None else "FAILED")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is None or not metrics:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            if Path(path).is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)

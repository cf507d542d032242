"""MLflow tracking for stage runs: one MLflow run per stage invocation.

Default store: ``sqlite:///<cwd>/mlflow.db`` (git-ignored); ``MLFLOW_TRACKING_URI`` overrides it and
``MLFLOW_EXPERIMENT_NAME`` the experiment (default ``localmim``). The store is checked before any work,
so an unreachable server fails the stage at once with a message naming the URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from localmim.tracking.lineage import (
    Upstream,
    collect_upstream,
    dataset_digest,
    lineage_path,
    pipeline_group,
    write_lineage,
)
from localmim.tracking.metrics import encoder_tags, is_measurement
from localmim.utils.gitinfo import git_commit
from localmim.utils.io import atomic_write_text, recover_dir, replace_dir, staging_dir

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


RETRY_SECONDS = 120.0
_TRANSIENT = ("database is locked", "database table is locked", "already exists",
              "unique constraint failed: experiments.name", "unique constraint failed: model_versions",
              "unique constraint failed: registered_models")


def retry(fn: Callable[..., Any], *args: Any, final_codes: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Call an MLflow function, retrying (with jittered back-off, up to 2 min) while a sqlite store shared by
    several pipelines is locked, or while two of them race to create the same experiment / table / version.
    An ``MlflowException`` whose ``error_code`` is in ``final_codes`` is raised at once (e.g. creating a registered
    model that exists: the caller's answer, not a race to wait out; waiting cost 2 min per pretraining run)."""
    delay, deadline = 0.05, time.monotonic() + RETRY_SECONDS
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException wrapping sqlalchemy's OperationalError / IntegrityError
            msg = str(e).lower()
            final = getattr(e, "error_code", None) in final_codes
            if final or not any(t in msg for t in _TRANSIENT) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<db>.lock`` next to a sqlite store (nothing for other stores)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


class StageRun:
    """One MLflow run for one stage invocation; a no-op on non-zero ranks (``enabled=False``).

    ``inputs`` (``{context: path}``) and ``outputs`` (directories) give the run its lineage (see
    :mod:`localmim.tracking.lineage`): upstream run ids as ``localmim.upstream.<stage>`` tags, upstream params as
    ``<section>.<key>`` params, each input as an MLflow dataset with a content digest, and a lineage file in
    every output directory on success. Stepped metrics are also kept to be written as curves (``curves_dir``,
    one ``<metric>.tsv`` with columns ``step``, ``<metric>``: DVC plots), even when MLflow logging is off.
    Metrics are sent in one batch per call; ``log_metrics`` never syncs a device.
    """

    def __init__(self, stage: str, section: str, cfg: Any, *, enabled: bool = True, system_metrics: bool = False,
                 inputs: dict[str, str] | None = None, outputs: list[str] | None = None,
                 curves_dir: str | Path | None = None):
        self.stage, self.section, self.cfg = stage, section, cfg
        self.main = enabled
        self.enabled = enabled and os.environ.get("LOCALMIM_TRACKING", "1") != "0"
        self.system_metrics = system_metrics
        self.inputs, self.outputs = dict(inputs or {}), [str(o) for o in outputs or []]
        self.curves_dir = Path(curves_dir) if curves_dir else None
        self.curves: dict[str, dict[int, float]] = {}
        self.last_step: int | None = None
        self.run_id: str | None = None
        self.group: str | None = None
        self.upstream: Upstream | None = None
        self._mlflow = None
        self._client = None
        self.t0 = time.time()

    def __enter__(self) -> StageRun:
        if self.main:  # outputs being rewritten no longer belong to the run that wrote them before
            for d in self.outputs:
                lineage_path(d, self.stage).unlink(missing_ok=True)
        if not self.enabled:
            return self
        uri = tracking_uri()
        check_reachable(uri)
        import mlflow

        mlflow.set_tracking_uri(uri)
        with store_lock(uri):  # MLflow creates / migrates a new sqlite schema non-atomically: one process at a time
            self._mlflow, self._client = mlflow, retry(mlflow.MlflowClient, uri)
            exp = retry(mlflow.set_experiment, os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
        self.experiment_id = exp.experiment_id
        self.upstream = collect_upstream(self.inputs)
        self.group, how = pipeline_group()
        out_key = f"{self.stage}:{Path(self.outputs[0] if self.outputs else '.').resolve()}"
        self._mark_stale(out_key)
        run = retry(mlflow.start_run, run_name=self.stage, tags=self._tags(how, out_key),
                    log_system_metrics=self.system_metrics)
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri
        try:
            if self.group is None:  # run by hand: a group of its own
                self.group = self.run_id
                self.set_tags({"localmim.group": self.group})
            self._log_params()
            self._log_inputs()
        except BaseException as e:  # __exit__ will not run: end the run here
            self.__exit__(type(e), e, None)
            raise
        return self

    def _tags(self, how: str, out_key: str) -> dict[str, str]:
        tags = {"stage": self.stage, "section": self.section, "git_commit": git_commit(),
                "localmim.group_source": how, "localmim.output": out_key,
                "localmim.host": socket.gethostname(), "localmim.pid": str(os.getpid())}
        if self.group:
            tags["localmim.group"] = self.group
        for env, tag in (("DVC_EXP_NAME", "localmim.dvc_exp"), ("DVC_STAGE", "localmim.dvc_stage")):
            if os.environ.get(env):
                tags[tag] = os.environ[env]
        if hasattr(self.cfg, "params_hash"):
            tags["params_hash"] = self.cfg.params_hash()
        for stage, run_id in self.upstream.runs.items():
            tags[f"localmim.upstream.{stage}"] = run_id
        return tags

    def _mark_stale(self, out_key: str) -> None:
        """Runs of this stage and output still RUNNING belong to a process that was killed: mark them KILLED
        (unless that process is alive on this host, i.e. really running)."""
        filt = f"tags.`localmim.output` = '{_quote(out_key)}' and attributes.status = 'RUNNING'"
        for run in retry(self._client.search_runs, [self.experiment_id], filt, max_results=100):
            host, pid = run.data.tags.get("localmim.host"), run.data.tags.get("localmim.pid", "")
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                continue
            retry(self._client.set_tag, run.info.run_id, "localmim.killed", f"stale; found by pid {os.getpid()}")
            retry(self._client.set_terminated, run.info.run_id, status="KILLED")

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = _flatten(self.cfg.to_dict()) if hasattr(self.cfg, "to_dict") else {}
        params.update(self.upstream.params)  # "<section>.<key>": pretrain.mask_ratio on a finetune run
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            retry(self._client.log_batch, self.run_id, params=items[i : i + 100])

    def _log_inputs(self) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        for ds in self.upstream.datasets:
            dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(ds["path"]).resolve())), name=ds["path"],
                                  digest=ds["digest"])
            tags = {"localmim.producer_run": ds["producer"]} if ds["producer"] else None
            retry(self._mlflow.log_input, dataset, context=ds["context"], tags=tags)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is None:
            return
        status = "FINISHED" if exc_type is None else "FAILED"
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt | SystemExit):
            status = "KILLED"
        try:
            self.log_metrics({"stage_seconds": time.time() - self.t0})
        finally:
            retry(self._client.set_terminated, self.run_id, status=status)
            try:  # pops the active run and stops the system-metrics thread; the status is already set
                self._mlflow.end_run(status=status)
            except Exception:  # noqa: BLE001 (a locked store here changes nothing that matters)
                pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, *, curve: bool = True) -> None:
        """Log host numbers; with ``step`` they are also kept as curves (``epoch`` is not: it is the x axis).
        The stage's final metrics are logged at the last step seen (``curve=False``), so that a metric that
        is also a curve (``top1``) ends where its curve ends instead of adding a point at step 0."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if step is not None and curve:
            self.last_step = max(self.last_step or 0, int(step))
        if step is not None and curve and self.main:
            for k, v in clean.items():
                if k != "epoch" and not is_measurement(k):  # curves are DVC plots: no times (MLflow has them)
                    self.curves.setdefault(k, {})[int(step)] = v
        if self._mlflow is None or not clean:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step or 0) for k, v in clean.items()]
        retry(self._client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            for k, v in tags.items():
                retry(self._client.set_tag, self.run_id, k, str(v))

    def finish(self, metrics: dict[str, float]) -> None:
        """After a successful stage: write the curves, register exported encoders, tag upstream encoders with
        this stage's headline metrics and leave a lineage file in every output directory."""
        if self.main and self.curves_dir is not None:  # an empty directory when nothing was stepped
            write_curves(self.curves_dir, self.curves)
        if self._mlflow is None:
            return
        registered = [m for d in self.outputs if (m := self._register_encoder(Path(d), metrics))]
        for m in self.upstream.models:
            self._tag_upstream_model(m, encoder_tags(self.stage, metrics))
        record = {"run_id": self.run_id, "stage": self.stage, "section": self.section,
                  "experiment_id": self.experiment_id, "tracking_uri": tracking_uri(), "group": self.group,
                  "params": {f"{self.section}.{k}": v for k, v in _flatten(self.cfg.to_dict()).items()}
                  if hasattr(self.cfg, "to_dict") else {},
                  "upstream": self.upstream.runs, "upstream_params": self.upstream.params,
                  "registered_model": registered[0] if registered else None, "upstream_models": self.upstream.models}
        for d in self.outputs:
            if Path(d).is_dir():
                write_lineage(d, record | {"output_digest": dataset_digest(d)})

    def _tag_upstream_model(self, model: dict[str, str], metrics: dict[str, float]) -> None:
        """Copy this stage's headline metrics onto the registered encoder version it used. The version may not be
        in this store (the encoder was made with another ``MLFLOW_TRACKING_URI``, or ``mlflow.db`` was deleted
        since): then say so and go on; the stage's results do not depend on it."""
        from mlflow.exceptions import MlflowException

        try:
            for k, v in metrics.items():
                retry(self._client.set_model_version_tag, model["name"], model["version"], f"{self.stage}.{k}", str(v))
        except MlflowException as e:
            print(f"localmim {self.stage}: warning: encoder {model['name']} version {model['version']} is not in "
                  f"{tracking_uri()} ({str(e).splitlines()[0]}); its registry entry is not tagged", file=sys.stderr)

    def _register_encoder(self, out: Path, metrics: dict[str, float]) -> dict[str, Any] | None:
        """Register ``out/encoder.{pt,json}`` (an exported encoder) as a version of model ``encoder-<model>``."""
        from mlflow.exceptions import MlflowException

        meta_file = out / "encoder.json"
        if not (meta_file.is_file() and (out / "encoder.pt").is_file()):
            return None
        meta = json.loads(meta_file.read_text())
        name = f"encoder-{meta.get('model') or meta['timm_name']}"
        if not self._client.list_artifacts(self.run_id, "encoder"):
            for f in ("encoder.pt", "encoder.json"):
                self.log_artifact(out / f, artifact_path="encoder")
        try:
            retry(self._client.create_registered_model, name, final_codes=("RESOURCE_ALREADY_EXISTS",),
                  description="Exported pre-trained encoders (timm state dict + encoder.json); one version per run.")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {k: str(v) for k, v in metrics.items()} | {"stage": self.stage, "group": str(self.group)}
        mv = retry(self._client.create_model_version, name, source=f"{self.artifact_uri}/encoder",
                   run_id=self.run_id, tags=tags)
        self.set_tags({"localmim.registered_model": f"{name}/{mv.version}"})
        return {"name": name, "version": str(mv.version)}


def write_curves(directory: Path, curves: dict[str, dict[int, float]]) -> None:
    """One ``<metric>.tsv`` per stepped metric (``step<TAB><metric>``), replacing the directory as a whole.

    A resumed run logs only the steps after its checkpoint: the points the directory holds before this run's first
    step are kept (they are the same run's: a checkpoint resumes only with the same params and data). A run that
    logged nothing (resumed at its end, e.g. a forced rerun) leaves the directory as it is."""
    recover_dir(directory)  # a swap interrupted by a crash: the earlier points are read back below
    first = min((s for points in curves.values() for s in points), default=None)
    if first is None and directory.is_dir():
        return
    if first:
        for name, points in read_curves(directory).items():
            curves[name] = {s: v for s, v in points.items() if s < first} | curves.get(name, {})
    tmp = staging_dir(directory)
    for name, points in curves.items():
        rows = "".join(f"{s}\t{points[s]!r}\n" for s in sorted(points))
        atomic_write_text(tmp / f"{name}.tsv", f"step\t{name}\n{rows}")
    replace_dir(tmp, directory)


def read_curves(directory: Path) -> dict[str, dict[int, float]]:
    """What :func:`write_curves` wrote (``{}`` when nothing)."""
    out: dict[str, dict[int, float]] = {}
    for f in sorted(directory.glob("*.tsv")) if directory.is_dir() else []:
        rows = [line.split("\t") for line in f.read_text().splitlines()[1:] if line]
        out[f.stem] = {int(s): float(v) for s, v in rows}
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

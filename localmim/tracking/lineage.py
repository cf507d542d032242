"""Run lineage without a database lookup: every stage leaves ``lineage.<run>.json`` next to its outputs.

The file holds the MLflow run id that produced the directory, its params (prefixed by section) and, transitively,
the runs and params of everything upstream. A downstream stage reads the files of its inputs before doing any
work, so its MLflow run can carry ``localmim.upstream.<stage>`` tags and the upstream params (``pretrain.*``).
Because the file stays with the outputs (Snakemake leaves it alone), a stage that did not rerun is *referenced* by
its original run id, never logged again.

The file is run metadata, not data: ``.dvcignore`` keeps it out of DVC's hash of the directory, so a rerun that
writes byte-identical outputs leaves the directory's hash, and every stage downstream, unchanged (otherwise a new
run id would rerun days of pretraining after identical shards). DVC therefore neither caches nor restores it; the
record holds the digest of the directory it describes (``output_digest``, :func:`dataset_digest`) and a record
whose directory no longer has that digest (``dvc checkout`` of another version, a hand edit) is ignored.

One pipeline invocation is one *group* (:func:`pipeline_group`): ``LOCALMIM_GROUP`` when set, else the
``snakemake`` / ``dvc`` process this stage descends from (its start time and pid), else none (a stage run by
hand is a group of its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmim.utils.io import LINEAGE_GLOB, atomic_write_json, is_run_metadata

PIPELINE_TOOLS = ("snakemake", "dvc")
_SMALL_DIR_FILES = 10_000  # directories with more files are digested from names + sizes + manifests only
_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ".csv", ".tsv"}


def lineage_path(out_dir: str | Path, run_name: str) -> Path:
    return Path(out_dir) / f"lineage.{run_name}.json"


def write_lineage(out_dir: str | Path, record: dict[str, Any]) -> Path:
    path = lineage_path(out_dir, record["stage"])
    atomic_write_json(path, record)
    return path


def find_lineage(path: str | Path, max_up: int = 3) -> list[dict[str, Any]]:
    """The lineage records of the nearest directory at or above ``path`` holding any (``[]`` when none or when
    they are stale: written for other contents of that directory)."""
    d = Path(path).resolve()
    if not d.is_dir():
        d = d.parent
    for _ in range(max_up + 1):
        files = sorted(d.glob(LINEAGE_GLOB))
        if files:
            out = []
            for f in files:
                try:
                    rec = json.loads(f.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                if isinstance(rec, dict) and rec.get("run_id"):
                    out.append(rec)
            digest = dataset_digest(d) if any("output_digest" in r for r in out) else None
            return [r for r in out if r.get("output_digest", digest) == digest]
        if d.parent == d:
            break
        d = d.parent
    return []


@dataclass
class Upstream:
    """What the inputs of a stage say about the runs that made them (transitively)."""

    runs: dict[str, str] = field(default_factory=dict)  # stage run name -> MLflow run id
    params: dict[str, Any] = field(default_factory=dict)  # "<section>.<key>" -> value
    models: list[dict[str, Any]] = field(default_factory=list)  # registered encoders upstream ({name, version})
    datasets: list[dict[str, Any]] = field(default_factory=list)  # {context, path, digest, producer}


def collect_upstream(inputs: dict[str, str]) -> Upstream:
    """Read the lineage of every input path (``{context: path}``); missing inputs are skipped."""
    up = Upstream()
    for context, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        records = find_lineage(path)
        for rec in records:
            up.runs.setdefault(rec["stage"], rec["run_id"])
            for stage, run_id in (rec.get("upstream") or {}).items():
                up.runs.setdefault(stage, run_id)
            for k, v in {**(rec.get("upstream_params") or {}), **(rec.get("params") or {})}.items():
                up.params.setdefault(k, v)
            for m in [rec.get("registered_model"), *(rec.get("upstream_models") or [])]:
                if m and m not in up.models:
                    up.models.append(m)
        producer = ",".join(r["run_id"] for r in records)
        up.datasets.append({"context": context, "path": str(path), "digest": dataset_digest(path),
                            "producer": producer})
    return up


def dataset_digest(path: str | Path) -> str:
    """A short content fingerprint of a file or directory (16 hex chars).

    Covers every file's relative path and size, the full bytes of manifests (``*.json``/``*.yaml``: the shard and
    view manifests hold a sha256 per shard) and, for directories of at most 10k files, the first 64 KiB of every
    file. Lineage files are left out, so re-running the producer on the same data gives the same digest.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        files = [p]
        root = p.parent
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not is_run_metadata(f))
        root = p
    sample = len(files) <= _SMALL_DIR_FILES
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0".encode())
        if f.suffix in _TEXT_SUFFIXES and st.st_size <= 64 << 20:
            h.update(f.read_bytes())
        elif sample:
            with open(f, "rb") as fh:
                h.update(fh.read(64 << 10))
    return h.hexdigest()[:16]


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks after boot) from ``/proc`` (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # fields after "pid (comm)": state ppid ... starttime is the 20th
    return int(rest[1]), int(rest[19])


def _tool_of(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for a in argv[:3]:  # `snakemake ...`, `python .../snakemake ...`, `python -m dvc ...`
        name = os.path.basename(a.decode(errors="replace"))
        if name in PIPELINE_TOOLS:
            return name
    return None


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def pipeline_ancestor(pid: int | None = None) -> tuple[str, int, float] | None:
    """The nearest ``snakemake`` / ``dvc`` process above ``pid``: (tool, pid, start time in epoch seconds)."""
    pid = os.getppid() if pid is None else pid
    seen = 0
    while pid > 1 and seen < 32:
        st = _proc_stat(pid)
        if st is None:
            return None
        tool = _tool_of(pid)
        if tool:
            return tool, pid, _boot_time() + st[1] / os.sysconf("SC_CLK_TCK")
        pid, seen = st[0], seen + 1
    return None


def pipeline_group() -> tuple[str | None, str]:
    """(group id, how it was found). ``LOCALMIM_GROUP`` wins; then the launching snakemake/dvc process."""
    env = os.environ.get("LOCALMIM_GROUP")
    if env:
        return env, "env"
    anc = pipeline_ancestor()
    if anc is not None:
        tool, pid, start = anc
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(start))
        return f"{tool}-{stamp}-{pid}", tool
    if os.environ.get("DVC_EXP_NAME"):
        return f"dvc-exp-{os.environ['DVC_EXP_NAME']}", "dvc_exp"
    return None, "none"

"""``localmim compare`` when MLflow has no runs: the DVC results of the workspace and of its experiments.

A teammate who pulled a pipeline's results (``git clone`` + ``localmim pull``) has ``metrics/`` (git-tracked) and
``dvc.lock``, and the DVC experiments ``dvc exp pull`` brought, but not the MLflow store of the machine that ran
them. Each row is then one DVC result, in the table ``localmim compare`` prints from MLflow:

* ``workspace``: the params ``dvc.lock`` records for the stages that made the outputs, the metrics files it lists;
* every DVC experiment of the checked-out commit (``dvc exp show --json``): its ``params.yaml`` and metrics files
  (``dvc exp run`` commits both with the ``dvc.lock`` they were recorded in).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from localmim.tracking.compare import Group, NothingToCompare
from localmim.tracking.metrics import TIMING_SUFFIX, headline_metrics


def _flat(tree: dict[str, Any]) -> dict[str, str]:
    from localmim.pipeline.pull import leaves

    return {k: str(v) for key, value in tree.items() for k, v in leaves(key, value).items()}


def workspace_group(lock: dict[str, Any]) -> Group:
    """The workspace's results: the params of every stage in ``dvc.lock``, the metrics files its stages list."""
    from localmim.pipeline.pull import lock_leaves

    g = Group("workspace", "workspace", 0)
    for entry in lock.values():
        g.params.update({k: str(v) for k, v in lock_leaves(entry).items()})
        for out in entry.get("outs") or []:
            path = Path(str(out.get("path", "")))
            if path.parts[:1] == ("metrics",) and path.suffix == ".json" and not path.name.endswith(TIMING_SUFFIX):
                if path.is_file():
                    g.metrics.update(headline_metrics(path.stem, json.loads(path.read_text())))
    return g


def experiment_groups(show: list[dict[str, Any]]) -> list[Group]:
    """One group per DVC experiment in ``dvc exp show --json`` output, oldest first (as MLflow's groups)."""
    groups = []
    for base in show:
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                name = rev.get("name") or exp.get("name") or str(rev.get("rev", ""))[:7]
                g = Group(name, name, 0)
                g.params = _flat(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
                for path, m in (data.get("metrics") or {}).items():
                    g.metrics.update(headline_metrics(Path(path).stem, (m or {}).get("data") or {}))
                groups.append((str(data.get("timestamp") or ""), g))  # ISO times: sorted as text
    return [g for _, g in sorted(groups, key=lambda tg: tg[0])]


def load_dvc_groups(names: list[str] | None = None, last: int | None = None) -> list[Group]:
    """The workspace and the DVC experiments as groups; ``names`` keeps those labelled so, ``last`` the N newest."""
    from localmim.pipeline.pull import YAMLError, read_lock

    if not Path("dvc.lock").is_file():
        raise NothingToCompare("no dvc.lock here either (run the pipeline, or `git pull` a repository that has one)")
    try:
        lock = read_lock()
    except YAMLError as e:
        raise NothingToCompare(str(e)) from None
    p = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise NothingToCompare(f"`dvc exp show` failed: {(p.stderr.strip() or p.stdout.strip())[-500:]}")
    groups = [workspace_group(lock), *experiment_groups(json.loads(p.stdout or "[]"))]
    groups = [g for g in groups if g.metrics]
    if names:
        missing = set(names) - {g.label for g in groups}
        if missing:
            raise NothingToCompare(f"no DVC experiment named {', '.join(sorted(missing))} with metrics")
        groups = [g for g in groups if g.label in names]
    if last:
        groups = groups[-last:]
    if not groups:
        raise NothingToCompare("neither metrics/ (listed in dvc.lock) nor a DVC experiment holds metrics")
    return groups

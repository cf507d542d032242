"""``localmim compare``: pipeline groups side by side, from any MLflow tracking store.

A *group* is one pipeline invocation (the ``localmim.group`` tag every stage run carries, see ``lineage.py``).
Its stages are its own runs plus the upstream runs it reused (found through ``localmim.upstream.<stage>`` tags:
a stage that did not rerun is referenced, not duplicated). The table has one row per group with only the params
that differ between groups and the headline metric of every stage; the plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmim.tracking.metrics import TIMING_SUFFIX, headline_metrics, metric_order

UPSTREAM_TAG = "localmim.upstream."


@dataclass
class Group:
    """One pipeline invocation: its runs by stage name (own and reused)."""

    id: str
    label: str
    start: int
    runs: dict[str, Any] = field(default_factory=dict)  # stage -> mlflow Run
    reused: dict[str, str] = field(default_factory=dict)  # stage -> group the reused run belongs to
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class NothingToCompare(RuntimeError):
    """No run/group matches; the message says what was looked for where. ``empty``: the store holds no runs at all
    (then the DVC results are compared instead, :func:`load_dvc_groups`)."""

    def __init__(self, message: str, empty: bool = False):
        super().__init__(message)
        self.empty = empty


def _run_params(run: Any, sections: set[str]) -> dict[str, str]:
    """Own params prefixed by the run's section; params carried from upstream already are (``pretrain.*``)."""
    section = run.data.tags.get("section", run.data.tags.get("stage", "?"))
    return {k if k.split(".", 1)[0] in sections else f"{section}.{k}": v for k, v in run.data.params.items()}


def load_groups(client: Any, experiment: str, *, names: list[str] | None = None, run_ids: list[str] | None = None,
                last: int | None = None) -> list[Group]:
    """The pipeline groups of MLflow experiment ``experiment`` (oldest first), filtered by group id / DVC
    experiment name (``names``), by member run ids, then the ``last`` N."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise NothingToCompare(f"no MLflow experiment {experiment!r} in this tracking store", empty=True)
    runs = client.search_runs([exp.experiment_id], max_results=50000, order_by=["attributes.start_time ASC"])
    if not runs:
        raise NothingToCompare(f"MLflow experiment {experiment!r} has no runs yet (run the pipeline first)", empty=True)
    by_id = {r.info.run_id: r for r in runs}
    sections = {r.data.tags.get("section") for r in runs} - {None}
    groups: dict[str, Group] = {}
    for r in runs:  # oldest first: the latest run of a stage in a group wins
        gid = r.data.tags.get("localmim.group") or r.info.run_id
        g = groups.setdefault(gid, Group(gid, r.data.tags.get("localmim.dvc_exp") or gid, r.info.start_time))
        stage = r.data.tags.get("stage", r.info.run_name)
        if r.info.status == "FINISHED" or stage not in g.runs:
            g.runs[stage] = r
    for g in groups.values():
        _add_reused(g, by_id, client)
        for stage, r in g.runs.items():
            for k, v in _run_params(r, sections).items():
                g.params.setdefault(k, v)
            g.metrics.update(headline_metrics(stage, r.data.metrics))
    selected = [g for g in groups.values() if g.metrics]  # groups with only data-prep stages: nothing to show
    if names:
        selected = [g for g in groups.values() if g.id in names or g.label in names]
        missing = set(names) - {g.id for g in selected} - {g.label for g in selected}
        if missing:
            raise NothingToCompare(f"no group or DVC experiment named {', '.join(sorted(missing))} in {experiment!r}")
    if run_ids:
        selected = [g for g in selected if {r.info.run_id for r in g.runs.values()} & set(run_ids)]
    selected.sort(key=lambda g: g.start)
    if last:
        selected = selected[-last:]
    if not selected:
        raise NothingToCompare(f"no pipeline group with results in MLflow experiment {experiment!r}")
    return selected


def _add_reused(g: Group, by_id: dict[str, Any], client: Any) -> None:
    """Follow the upstream tags of the group's own runs to the runs of stages it did not rerun."""
    for r in list(g.runs.values()):
        for tag, run_id in r.data.tags.items():
            stage = tag.removeprefix(UPSTREAM_TAG)
            if not tag.startswith(UPSTREAM_TAG) or stage in g.runs:
                continue
            up = by_id.get(run_id)
            if up is None:
                try:
                    up = client.get_run(run_id)
                except Exception:  # noqa: BLE001 (deleted or in another store: leave it out)
                    continue
            g.runs[stage] = up
            g.reused[stage] = up.data.tags.get("localmim.group", run_id)


def differing_params(groups: list[Group]) -> list[str]:
    """Params every group has, with at least two distinct values."""
    if len(groups) < 2:
        return []
    common = set.intersection(*(set(g.params) for g in groups))
    return sorted(k for k in common if len({g.params[k] for g in groups}) > 1)


def table_rows(groups: list[Group], diff: list[str]) -> tuple[list[str], list[list[str]]]:
    metric_cols = sorted({k for g in groups for k in g.metrics}, key=metric_order)
    header = ["group", *diff, *metric_cols, "reused"]
    rows = []
    for g in groups:
        reused = ", ".join(f"{s} ({o[:24]})" for s, o in sorted(g.reused.items()) if o != g.id)
        rows.append([g.label, *(g.params[k] for k in diff),
                     *(_fmt(g.metrics.get(c)) for c in metric_cols), reused or "-"])
    return header, rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def render(groups: list[Group], diff: list[str], fmt: str) -> str:
    header, rows = table_rows(groups, diff)
    if fmt == "json":
        return json.dumps([{"group": g.id, "label": g.label, "params": {k: g.params[k] for k in diff},
                            "metrics": g.metrics, "runs": {s: r.info.run_id for s, r in g.runs.items()},
                            "reused": g.reused} for g in groups], indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)]) + "\n"


def main(args: argparse.Namespace) -> int:
    import os

    from localmim.tracking.mlflow_run import DEFAULT_EXPERIMENT, store_lock, tracking_uri

    uri = args.tracking_uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return compare_dvc_results(args, f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI / --tracking-uri to a "
                                         "team's server)")
    import mlflow

    from localmim.tracking.compare_plots import write_plots

    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
    default = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    experiment = args.experiment or default
    names = list(args.names)
    if args.experiment and client.get_experiment_by_name(args.experiment) is None:
        experiment, names = default, [*names, args.experiment]  # a DVC experiment name
    try:
        groups = load_groups(client, experiment, names=names, run_ids=args.runs, last=args.last)
    except NothingToCompare as e:
        if e.empty:
            return compare_dvc_results(args, f"{e} (tracking URI {uri})")
        print(f"localmim compare: nothing to compare: {e} (tracking URI {uri})", file=sys.stderr)
        return 1
    diff = write_table(groups, args)
    if len(groups) < 2:
        print(f"localmim compare: only one pipeline group in {experiment!r}; run another (e.g. `dvc exp run -S "
              "pretrain.mask_ratio=0.6`) to compare", file=sys.stderr)
    elif not diff:
        print("localmim compare: the groups have the same params (reruns of one configuration)", file=sys.stderr)
    paths = write_plots(client, groups, diff, Path(args.out))
    print(f"localmim compare: {len(groups)} groups; plots: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def write_table(groups: list[Group], args: argparse.Namespace) -> list[str]:
    """Print the table and write it to ``<out>/compare.<format>`` (atomically); returns the differing params."""
    from localmim.utils.io import atomic_write_text

    diff = differing_params(groups)
    text = render(groups, diff, args.format)
    print(text, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"compare.{args.format}", text)
    return diff


# ------------------------------------------------------------------ without MLflow runs: the DVC results


def _flat(tree: dict[str, Any]) -> dict[str, str]:
    from localmim.utils.dvclock import leaves

    return {k: str(v) for key, value in tree.items() for k, v in leaves(key, value).items()}


def workspace_group(lock: dict[str, Any]) -> Group:
    """The workspace's results: the params of every stage in ``dvc.lock``, the metrics files its stages list."""
    from localmim.utils.dvclock import lock_leaves

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
    from localmim.utils.dvclock import YAMLError, read_lock

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


def compare_dvc_results(args: argparse.Namespace, why: str) -> int:
    """MLflow has no runs here (``why``): the table of the DVC results instead (:func:`load_dvc_groups`), no plots."""
    try:
        groups = load_dvc_groups(names=list(args.names) + ([args.experiment] if args.experiment else []),
                                 last=args.last)
    except NothingToCompare as e:
        print(f"localmim compare: nothing to compare: {why}; {e}", file=sys.stderr)
        return 1
    print(f"localmim compare: MLflow has no runs here: {why}. Comparing the {len(groups)} DVC results with metrics "
          "instead: the workspace (metrics/ and dvc.lock) and the DVC experiments of this commit", file=sys.stderr)
    write_table(groups, args)
    print("localmim compare: no plots without MLflow runs (`dvc plots diff` draws the DVC curves)", file=sys.stderr)
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="GROUP",
                   help="group ids (tag localmim.group) or DVC experiment names to compare (default: all groups)")
    p.add_argument("--experiment", metavar="NAME",
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or localmim); a name that is not one "
                        "is taken as a DVC experiment name")
    p.add_argument("--runs", nargs="+", metavar="ID", help="only the groups holding these MLflow run ids")
    p.add_argument("--last", type=int, metavar="N", help="only the N most recent groups")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md", help="table format (default: md)")
    p.add_argument("--out", default="outputs/compare", help="directory for the table and the PNG plots")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                                          "sqlite:///./mlflow.db)")

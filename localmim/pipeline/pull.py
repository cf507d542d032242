"""``localmim pull``: ``dvc pull``, then record for Snakemake what DVC restored, so that neither tool reruns it.

Why a step of its own: Snakemake keeps its records in ``.snakemake/`` (never shared), and in a fresh clone every
restored file carries the time of the checkout. Snakemake 9 reruns a job whose input is newer than its oldest output
whatever the profile's rerun triggers say (git checks the metrics files out before DVC restores the data they were
computed from), and without a record it cannot see a params change at all. After ``git clone`` + ``dvc pull`` it
therefore reran pretraining and everything after it, and would not have rerun a stage whose params changed since.

What it does (docs/reproducing.md, "Share results with a team"):

1. ``dvc pull [-r REMOTE]``. Outputs missing from the remote are reported by DVC; the rest is still recorded.
2. ``dvc status --json``: a stage of ``dvc.lock`` counts as *restored* when DVC lists no changed output, no changed
   data or code dependency and no changed command for it (its params may have changed; "always changed" is allowed).
   A manifest stage of a real dataset folder also needs the folder's fingerprint to equal the pulled manifest's (the
   rerun trigger Snakemake compares).
3. ``snakemake --touch`` of exactly those stages (``--allowed-rules``, ``--forceall``, their outputs as targets), with
   each stage's params *as dvc.lock records them* overlaid on params.yaml. Snakemake touches the outputs in DAG order
   and records (``.snakemake/metadata``) the params, command, input set and software env each one was made with.

So Snakemake reruns exactly what DVC reruns: a stage whose params changed since ``dvc.lock`` (its record holds the
old params: "params have changed"), a stage whose outputs were not restored (missing output), and everything
downstream of either. A stage whose data or code dependency changed is not recorded; its restored outputs are
older than the touched outputs it reads, so Snakemake reruns it by their times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from localmim.pipeline.dag import DATASETS, RAW, Node, pipeline
from localmim.utils.dvclock import PARAMS, YAMLError, leaves, lock_leaves, nest, read_lock, read_yaml12
from localmim.utils.io import atomic_write_text

PROG = "localmim pull"


def _get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)


def blocking_changes(entries: list[Any]) -> list[str]:
    """What in a stage's ``dvc status --json`` entries stops it from counting as restored: changed outputs, data or
    code dependencies, command (a changed params file only means the stage reruns; "always changed" is not one)."""
    found = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue  # "always changed"
        for kind, changes in entry.items():
            if kind == "changed deps" and isinstance(changes, dict):
                found += [f"{path} {what}" for path, what in changes.items() if not isinstance(what, dict)]
            else:
                found.append(kind if not isinstance(changes, dict) else
                             f"{kind}: " + ", ".join(f"{p} {w}" for p, w in changes.items()))
    return found


def dataset_matches(name: str, params: dict[str, Any]) -> str | None:
    """None when manifest stage ``dataset_<name>`` may be recorded, else why not: a real dataset folder must have
    the fingerprint the pulled manifest holds (Snakemake's rerun trigger of the rule, ``dataset_state``)."""
    root = _get(params, f"datasets.{name}") or ""
    if not root:
        return None  # the embedded copy: synth's output, checked by DVC like any dependency
    from localmim.data.raw.datasets import DatasetError, state

    manifest = Path(RAW) / f"{name}.json"
    try:
        recorded = json.loads(manifest.read_text()).get("fingerprint")
        now = state(name, root, _get(params, "datasets.fingerprint") or "stat", outdir=RAW)
    except (OSError, ValueError, DatasetError) as e:
        return f"datasets.{name}={root}: {e}"
    return None if now == recorded else f"the folder datasets.{name}={root} differs from {manifest}'s fingerprint"


def _dataset_block(stage: str, locked: dict[str, Any], current: dict[str, Any], params: dict[str, Any]) -> str | None:
    """Why manifest stage ``stage`` may not be recorded (None: it may, or it is no manifest stage). Its Snakemake
    trigger scans the folder the params name: a folder named by dvc.lock only may not exist here."""
    name = stage.removeprefix("dataset_")
    if not stage.startswith("dataset_") or name not in DATASETS:
        return None
    if locked != current:
        keys = sorted(k for k in set(locked) | set(current) if locked.get(k) != current.get(k))
        return f"datasets params changed since dvc.lock: {', '.join(keys)}"
    return dataset_matches(name, params)


def plan(nodes: list[Node], status: dict[str, Any], lock: dict[str, Any],
         params: dict[str, Any]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """``(record, stale, skipped)``: the restored stages in DAG order, those among them whose params changed since
    dvc.lock (key named), and the stages of dvc.lock left unrecorded with the reason."""
    record, stale, skipped = [], {}, {}
    for n in nodes:
        if n.name not in lock:
            continue
        blocking = blocking_changes(status.get(n.name, []))
        locked = lock_leaves(lock[n.name])
        current = {k: v for key in n.params for k, v in leaves(key, _get(params, key)).items()}
        # Snakemake merges a config file into params.yaml key by key: a key that params.yaml has and dvc.lock lacks
        # (added since) cannot be expressed, and recording it with today's value would hide the change.
        added = sorted(set(current) - set(locked))
        if blocking:
            skipped[n.name] = f"DVC: {'; '.join(blocking)}"
        elif added:
            skipped[n.name] = f"params.yaml has keys dvc.lock lacks: {', '.join(added)}"
        elif why := _dataset_block(n.name, locked, current, params):
            skipped[n.name] = why
        else:
            record.append(n.name)
            changed = sorted(k for k in locked if current.get(k, object()) != locked[k])
            if changed:
                stale[n.name] = ", ".join(changed)
    return record, stale, skipped


def passes(record: list[str], overlays: dict[str, dict[str, Any]]) -> list[tuple[list[str], dict[str, Any]]]:
    """Group the stages (DAG order) into touch runs whose dvc.lock params agree on every shared key; a later run
    holds no stage upstream of an earlier one, so the touched outputs stay newer than the inputs they were made from.
    """
    out: list[tuple[list[str], dict[str, Any]]] = []
    for name in record:
        leaves = overlays[name]
        if out and all(out[-1][1].get(k, v) == v for k, v in leaves.items()):
            out[-1][0].append(name)
            out[-1][1].update(leaves)
        else:
            out.append(([name], dict(leaves)))
    return out


def touch(nodes: dict[str, Node], rules: list[str], overlay: dict[str, Any]) -> subprocess.CompletedProcess:
    """``snakemake --touch`` of ``rules`` only, with ``overlay`` (dotted leaves) merged into params.yaml."""
    text = yaml.safe_dump(nest(overlay), sort_keys=True)
    cfg = Path(".snakemake/localmim") / f"pull-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg, text)
    targets = [o for r in rules for o in nodes[r].outs + nodes[r].metrics + nodes[r].plots if isinstance(o, str)]
    cmd = [sys.executable, "-m", "snakemake", "--touch", "--forceall", "--cores", "1", "--quiet", "all",
           "--configfile", str(cfg), "--allowed-rules", *rules, "--", *targets]
    return subprocess.run(cmd, capture_output=True, text=True)


def _last_line(p: subprocess.CompletedProcess) -> str:
    lines = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit code {p.returncode}"


def record_restored() -> int:
    """Steps 2 and 3 of the module doc: ask DVC what is restored and record exactly that for Snakemake."""
    try:
        lock, params = read_lock(), read_yaml12(Path(PARAMS))
    except FileNotFoundError as e:
        print(f"{PROG}: nothing to record: {e.filename} not found (commit dvc.lock after a run)", file=sys.stderr)
        return 1
    except YAMLError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    p = _dvc("status", "--json")
    if p.returncode != 0:
        print(f"{PROG}: error: `dvc status` failed: {_last_line(p)}", file=sys.stderr)
        return 1
    nodes = pipeline()
    record, stale, skipped = plan(nodes, json.loads(p.stdout or "{}"), lock, params)
    for name, why in skipped.items():
        print(f"{PROG}: {name}: not restored ({why}); Snakemake and DVC rerun it")
    for name, keys in stale.items():
        print(f"{PROG}: {name}: params changed since dvc.lock ({keys}); Snakemake and DVC rerun it")
    by_name = {n.name: n for n in nodes}
    done: list[str] = []
    for rules, overlay in passes(record, {r: lock_leaves(lock[r]) for r in record}):
        t = touch(by_name, rules, overlay)
        if t.returncode != 0:  # e.g. dvc.lock's params fail today's schema; later runs would sit on unrecorded ones
            left = record[len(done):]
            print(f"{t.stdout[-2000:]}{t.stderr[-3000:]}\n{PROG}: error: `snakemake --touch` failed (above) for "
                  f"{', '.join(rules)}; not recorded: {', '.join(left)}. Snakemake decides those by file times; "
                  f"`snakemake --forcerun {' '.join(left)}` reruns them", file=sys.stderr)
            return 1
        done += rules
    never = [n.name for n in nodes if n.name not in lock]
    if record:
        print(f"{PROG}: recorded for Snakemake (outputs restored by DVC, params from dvc.lock): {', '.join(record)}")
    if never:
        print(f"{PROG}: not in dvc.lock (never run and committed): {', '.join(never)}")
    return 0


def main(args: argparse.Namespace) -> int:
    if not Path("dvc.yaml").is_file():
        print(f"{PROG}: error: no dvc.yaml here; run it in the repository root", file=sys.stderr)
        return 2
    pulled = 0
    if not args.record_only:
        try:  # the stages dvc.lock holds: a stage never run has nothing to pull, and would fail `dvc pull`
            stages = list(read_lock()) if Path("dvc.lock").is_file() else []
        except YAMLError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        remote = ["-r", args.remote] if args.remote else []
        p = subprocess.run([sys.executable, "-m", "dvc", "pull", *remote, *stages])
        if p.returncode != 0:
            print(f"{PROG}: `dvc pull` did not restore everything (above); recording what it restored",
                  file=sys.stderr)
            pulled = 1
    return record_restored() or pulled


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--remote", help="the DVC remote to pull from (default: the repository's default remote)")
    p.add_argument("--record-only", action="store_true",
                   help="skip `dvc pull` (the outputs are restored already, e.g. by `dvc checkout`); only record them "
                        "for Snakemake")

"""The pattern every stage follows.

A stage is one function ``run(cfg, ctx) -> metrics`` registered with :func:`stage`. The CLI runner
(:func:`execute`) does the same thing for every stage, in this order:

1. resolve params: ``params.yaml`` (or ``--params FILE``) + ``--set key.path=value`` overrides + the
   stage's own flags (each flag is just sugar for a ``--set`` on its section);
2. validate the stage's section (unknown key / bad value -> one line naming the key, exit 2);
3. check the MLflow store is reachable (fail fast, before any work);
4. run the stage inside one MLflow run (params logged, tags: stage, git commit, params hash, pipeline group,
   the upstream runs found in the inputs' lineage files, input datasets; see ``lineage.py``), unless the stage's
   ``tracked(cfg, args)`` says this invocation is bookkeeping (the embedded copy's dataset manifest);
5. log the returned metrics; write the curves, register an exported encoder, leave a lineage file in every
   output directory. A run stopped for resubmission (``runtime.preempt.StopForResubmit``: a time limit or a
   preemption, after its checkpoint) skips this: the MLflow run ends KILLED with tag ``stopped=preempted`` and the
   exit status is ``RESUBMIT_EXIT`` (75);
6. turn an error of the stage's input (:data:`STAGE_ERRORS`) into one line naming the stage, exit 1: stage modules
   do not catch errors to re-raise their message.

Stages write their outputs atomically (``localmim.utils.io``; a whole directory with ``replace_dir``) and dump the
resolved params next to them with :meth:`StageContext.dump_params`. Default paths: :mod:`localmim.pipeline.paths`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmim.config.base import ParamsError, Section, apply_overrides, read_params_file, validate_section
from localmim.pipeline import paths
from localmim.runtime.preempt import RESUBMIT_EXIT, StopForResubmit
from localmim.tracking.metrics import split_measurements, timing_path
from localmim.tracking.mlflow_run import StageRun, TrackingError
from localmim.utils.io import atomic_write_json, atomic_write_yaml


class StageError(RuntimeError):
    """A stage cannot do its work; the message names the file/param and the problem."""


@dataclass
class Flag:
    """A stage CLI flag mapped onto a params key of the stage's section (``key``) or kept as a plain arg."""

    flags: tuple[str, ...]
    key: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def flag(*flags: str, key: str | None = None, **kwargs: Any) -> Flag:
    return Flag(tuple(flags), key, kwargs)


def shared_flags(stage: str, *names: str) -> list[Flag]:
    """The flags several stages share, by name, in the order given: the paths ``encoder``, ``train``, ``val``,
    ``out`` (``data/<stage>``), ``ckpt-dir`` (``data/checkpoints/<stage>``), ``metrics`` (``metrics/<stage>.json``),
    whose defaults are the DAG's paths (:mod:`localmim.pipeline.paths`); the params ``epochs``, ``iters``,
    ``batch-size``, ``lr``, ``device``; and ``no-progress``."""
    dflt = " (default: %(default)s)"
    known = {
        "encoder": flag("--encoder", default=paths.ENCODER, help="exported encoder: directory or .pt" + dflt),
        "train": flag("--train", default=paths.shards("train"), help="train shard directory" + dflt),
        "val": flag("--val", default=paths.shards("val"), help="val shard directory" + dflt),
        "out": flag("--out", default=paths.out_dir(stage), help="output directory" + dflt),
        "ckpt-dir": flag("--ckpt-dir", default=paths.ckpt_dir(stage),
                         help="resumable checkpoints, outside the DAG's outputs" + dflt),
        "metrics": flag("--metrics", default=paths.metrics_file(stage), help="metrics file" + dflt),
        "epochs": flag("--epochs", key="epochs", type=int, metavar="N", help="epochs"),
        "iters": flag("--iters", key="iters", type=int, metavar="N", help="training iterations"),
        "batch-size": flag("--batch-size", key="batch_size", type=int, metavar="N", help="batch size per device"),
        "lr": flag("--lr", key="lr", type=float, metavar="LR", help="absolute peak lr"),
        "device": flag("--device", key="device", choices=["auto", "cpu", "cuda"], help="device"),
        "no-progress": flag("--no-progress", action="store_true", help="no progress bar"),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"shared_flags: unknown {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


@dataclass
class StageDef:
    name: str
    section: str
    config: type[Section]
    run: Callable[[Any, StageContext], dict[str, float] | None]
    help: str
    flags: list[Flag]
    run_name: Callable[[argparse.Namespace], str] | None = None
    system_metrics: bool = False
    # Input paths for lineage, ``inputs(cfg, args) -> {context: path}``; default: the args named in INPUT_ARGS.
    inputs: Callable[[Any, argparse.Namespace], dict[str, str]] | None = None
    # Whether this invocation is an MLflow run, ``tracked(cfg, args)``; default: always.
    tracked: Callable[[Any, argparse.Namespace], bool] | None = None


# Conventional arg names (argparse dests) of stage inputs and output directories, for lineage.
INPUT_ARGS = ("src", "encoder", "train", "val", "shards", "data_dir", "coco", "ade20k")
OUTPUT_ARGS = ("out",)

STAGES: dict[str, StageDef] = {}


def stage(
    name: str,
    *,
    section: str,
    config: type[Section],
    help: str,
    flags: list[Flag] | None = None,
    run_name: Callable[[argparse.Namespace], str] | None = None,
    system_metrics: bool = False,
    inputs: Callable[[Any, argparse.Namespace], dict[str, str]] | None = None,
    tracked: Callable[[Any, argparse.Namespace], bool] | None = None,
) -> Callable:
    """Register ``run(cfg, ctx)`` as the stage command ``localmim <name>``.

    ``inputs(cfg, args)`` names the input paths (``{context: path}``) when the conventional arg names
    (:data:`INPUT_ARGS`) do not say it (e.g. an input chosen by a param)."""

    def deco(fn: Callable) -> Callable:
        STAGES[name] = StageDef(name, section, config, fn, help, flags or [], run_name, system_metrics, inputs,
                                tracked)
        return fn

    return deco


@dataclass
class StageContext:
    """What a running stage gets besides its config: CLI args, the tracker, and the params source."""

    name: str
    section: str
    args: argparse.Namespace
    params_file: Path
    overrides: list[str]
    tracker: StageRun
    params_tree: dict[str, Any]

    @property
    def is_main(self) -> bool:
        return int(os.environ.get("RANK", "0")) == 0

    def write_metrics(self, path: str | Path, metrics: dict[str, Any]) -> Path:
        """Write the stage's metrics file (a DVC metric): its results only. Times, rates and memory
        (``tracking.metrics.is_measurement``) go to ``<stem>.timing.json`` beside it, which DVC does not track, so
        that a rerun computing the same results leaves the metrics file, and what reads it, unchanged."""
        results, measured = split_measurements(metrics)
        atomic_write_json(timing_path(path), measured)
        atomic_write_json(path, results)
        return Path(path)

    def dump_params(self, cfg: Section, out_dir: str | Path, name: str = "params.yaml") -> Path:
        """Write the resolved section next to the stage outputs (``{section: {...}}``)."""
        path = Path(out_dir) / name
        atomic_write_yaml(path, {self.section: cfg.to_dict()})
        return path


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="FILE", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a param, same syntax as `dvc exp run -S` (repeatable)",
    )


def build_parser(p: argparse.ArgumentParser, sd: StageDef) -> None:
    for f in sd.flags:
        kw = dict(f.kwargs)
        if f.key is not None:
            field_info = sd.config.model_fields.get(f.key.split(".")[0])
            if field_info is not None and "help" in kw and field_info.default is not None:
                kw["help"] = f"{kw['help']} (params: {sd.section}.{f.key})"
            kw.setdefault("default", None)
            if f.flags[0].startswith("-"):
                kw["dest"] = "param:" + f.key
            else:
                # positional: dest is the argparse name; remember the mapping
                kw.setdefault("metavar", f.flags[0].upper())
        p.add_argument(*f.flags, **kw)
    add_common_args(p)


def flag_overrides(sd: StageDef, args: argparse.Namespace) -> list[str]:
    """Turn the stage's param flags into ``section.key=value`` overrides (JSON values are valid YAML)."""
    out = []
    ns = vars(args)
    for f in sd.flags:
        if f.key is None:
            continue
        dest = "param:" + f.key if f.flags[0].startswith("-") else f.flags[0]
        value = ns.get(dest)
        if value is not None:
            out.append(f"{sd.section}.{f.key}={json.dumps(value)}")
    return out


def resolve(sd: StageDef, args: argparse.Namespace) -> tuple[Section, dict[str, Any], list[str]]:
    overrides = list(args.overrides) + flag_overrides(sd, args)
    tree = apply_overrides(read_params_file(args.params), overrides)
    cfg = validate_section(sd.section, sd.config, tree.get(sd.section), source=str(args.params))
    return cfg, tree, overrides


def lineage_paths(
    sd: StageDef, cfg: Section, args: argparse.Namespace
) -> tuple[dict[str, str], list[str], Path | None]:
    """(inputs ``{context: path}``, output directories, curves directory) of one stage invocation.

    Curves go to ``<metrics dir>/curves/<metrics stem>/`` for stages with a ``--metrics`` file (DVC ``plots:``).
    """
    ns = vars(args)
    if sd.inputs is not None:
        inputs = {k: str(v) for k, v in sd.inputs(cfg, args).items() if v}
    else:
        inputs = {k: str(ns[k]) for k in INPUT_ARGS if isinstance(ns.get(k), str | Path)}
    outputs = [str(ns[k]) for k in OUTPUT_ARGS if isinstance(ns.get(k), str | Path)]
    metrics = ns.get("metrics")
    curves = Path(paths.curves_dir(metrics)) if isinstance(metrics, str | Path) else None
    return inputs, outputs, curves


# What a stage raises for bad input (a param, a file, a dataset: ParamsError, DatasetError, CocoError, ImageFileError,
# ModelArtifactError, ... are ValueErrors; a missing or unreadable file an OSError) or a run that cannot go on (a
# non-finite loss: FloatingPointError): the runner prints one line naming the stage, the stage modules never wrap.
STAGE_ERRORS = (StageError, TrackingError, ValueError, OSError, FloatingPointError)


def error_line(err: BaseException) -> str:
    """The message of ``err`` for the one-line error: an error re-raised by a DataLoader embeds the worker's
    traceback, of which the last line (``<path>: <reason>``, without the exception's module path) is kept."""
    if "Traceback (most recent call last)" not in str(err):
        return str(err).strip()
    from localmim.data.raw.imagefile import one_line

    return one_line(err)


_HANDLER_PID: list[int] = []


def _sigterm_to_exit(signum, frame) -> None:  # noqa: ARG001
    """In the stage process: unwind through StageRun.__exit__ (the run ends KILLED, not RUNNING). In a forked
    child that inherited the handler (a multiprocessing / DataLoader worker: ``Pool.terminate`` stops them with
    SIGTERM and expects them to die at once) it does what the default action does."""
    if _HANDLER_PID and os.getpid() != _HANDLER_PID[-1]:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)


def execute(sd: StageDef, args: argparse.Namespace) -> int:
    """Run one stage end to end (see module docstring); returns the process exit code."""
    prog = f"localmim {sd.name}"
    try:
        cfg, tree, overrides = resolve(sd, args)
    except ParamsError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    run_name = sd.run_name(args) if sd.run_name else sd.name
    is_main = int(os.environ.get("RANK", "0")) == 0
    inputs, outputs, curves = lineage_paths(sd, cfg, args)
    _HANDLER_PID.append(os.getpid())
    previous = signal.signal(signal.SIGTERM, _sigterm_to_exit) if is_main else None
    try:
        tracked = sd.tracked is None or sd.tracked(cfg, args)
        with StageRun(run_name, sd.section, cfg, enabled=is_main and tracked, system_metrics=sd.system_metrics,
                      inputs=inputs, outputs=outputs, curves_dir=curves) as tracker:
            ctx = StageContext(sd.name, sd.section, args, Path(args.params), overrides, tracker, tree)
            try:
                metrics = sd.run(cfg, ctx) or {}
            except StopForResubmit as e:  # a SystemExit: the run ends KILLED, tagged; no outputs were written
                tracker.set_tags({"stopped": "preempted", "stopped_by": e.signal_name or "?",
                                  "resume_checkpoint": e.checkpoint or ""})
                raise
            numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            tracker.log_metrics(numeric, step=tracker.last_step, curve=False)
            tracker.finish(numeric)
    except StopForResubmit as e:
        if is_main:
            print(f"{prog}: {e}", file=sys.stderr)
        return RESUBMIT_EXIT
    except STAGE_ERRORS as e:
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0

"""The pipeline DAG, declared once; dvc.yaml, the Snakemake rules, the params schema and the conda env are generated.

``localmim dag --write`` regenerates every file of :data:`GENERATED` from :func:`pipeline` (rendering lives in
:mod:`localmim.pipeline.render`); ``localmim dag --check`` (``make test``) fails when a committed file drifted.

Every node runs one ``localmim`` CLI command and declares the params keys it reads (DVC ``params:`` and the
Snakemake ``params:`` rerun trigger), its inputs and outputs; paths are relative to the repository root. The DAG
has the same nodes whatever the params say (a param never requires regenerating files): ``targets`` always exists
and is a cheap placeholder while ``pretrain.data`` is ``online``; the ``dataset_<name>`` nodes always write the
manifest that later nodes read the dataset root from, of a real dataset (``datasets.<name>``) or of the embedded
one. Snakemake hands every command the config it sees (``--params`` of a file holding the rule's params, named by
their hash); DVC's commands read ``params.yaml``, which ``dvc exp run -S`` edits. See docs/reproducing.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmim.pipeline.paths import (
    ANALYZE_PLOTS,
    ENCODER,
    IMPORTED,
    RAW,
    VIEWS,
    ckpt_dir,
    curves_dir,
    manifest,
    metrics_file,
    out_dir,
    raw,
    shards,
)

TORCHRUN = "torchrun"
DATASETS = ("imagenet", "ade20k", "coco")


@dataclass
class Node:
    """One DAG stage: a DVC stage and a Snakemake rule running the same ``localmim`` command.

    ``params`` are params keys (a section, or ``section.key``). ``smk_params`` replaces the Snakemake params
    expressions derived from them (key -> Python expression over ``config``) where a rule must not rerun on
    keys its command ignores in some mode; the rule's command reads exactly these values (its params file).
    ``gpu``: a training rule (GPU node on a cluster, torchrun launcher
    with ``<params[0]>.nproc_per_node`` processes). ``resources``: extra Snakemake resources (str values are
    Snakemake expressions, others literals).
    """

    name: str
    cmd: str
    params: list[str]
    outs: list[str]
    deps: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    threads: int = 1
    resources: dict[str, Any] = field(default_factory=dict)
    launcher: str | None = None  # "torchrun": run ``cmd`` under torch.distributed through localmim.utils.launch
    smk_params: dict[str, str] | None = None
    report: list[str] = field(default_factory=list)  # outputs shown in `snakemake --report` (besides metrics)
    # DVC reruns the stage on every `dvc repro` (what it reads lies outside the repository; downstream stages
    # still rerun only when its outputs change)
    always_changed: bool = False
    # Snakemake-only rerun triggers (param name -> expression, e.g. a function of wildcards), not in the params file
    smk_triggers: dict[str, str] = field(default_factory=dict)
    # one process on one GPU when ``<section>.device`` is not cpu (feature passes of linprobe / analyze): on a
    # cluster the job asks for 1 GPU on the GPU partition
    one_gpu: bool = False

    @property
    def section(self) -> str:
        return self.params[0].split(".")[0]

    @property
    def gpu(self) -> bool:
        return self.launcher == TORCHRUN

    def command(self, tool: str) -> str:
        """The shell command for ``tool`` (``dvc``: reads params.yaml; ``smk``: reads Snakemake's config file)."""
        if self.launcher not in (None, TORCHRUN):
            raise ValueError(f"node {self.name}: unknown launcher {self.launcher!r}")
        rest = self.cmd.removeprefix("localmim ")
        if not self.params:  # a command that reads no params (e.g. the summary)
            return self.cmd if tool == "dvc" else f"python -m localmim.cli {rest} 2>&1 | tee {{log}}"
        if tool == "dvc":
            if self.launcher is None:
                return self.cmd
            s = self.section
            nodes = f" --nnodes ${{{s}.nnodes}}" if self.nnodes else ""
            return (f"python -m localmim.utils.launch --nproc-per-node ${{{s}.nproc_per_node}} --device ${{{s}.device}}"
                    f"{nodes} {rest}")
        # Snakemake: ``python -m`` finds the package in the working directory, so the rules also run in the
        # conda env of workflow/envs (``--sdm conda``), which holds the pinned dependencies but not the project.
        if self.launcher is None:
            head = "python -m localmim.cli"
        else:
            # `trap '' TERM`: at a SLURM time limit or preemption every process of the job gets SIGTERM; this shell
            # and its tee (which inherits the ignore) must outlive the launcher, which passes SIGTERM on to the
            # ranks and exits 75 once they have checkpointed (the launcher and the ranks install their own handlers)
            head = ("trap '' TERM; python -m localmim.utils.launch --nproc-per-node {resources.nproc}"
                    " --device {params.device}")
            head += " --nnodes {resources.nodes}" if self.nnodes else ""
        return f"{head} {rest} --params {{params.file}} 2>&1 | tee {{log}}"

    @property
    def nnodes(self) -> bool:
        """A torchrun node whose section has ``nnodes`` (several nodes through the launcher's ``srun``)."""
        if self.launcher != TORCHRUN:
            return False
        from localmim.config import all_sections

        cls = all_sections().get(self.section)
        return cls is not None and "nnodes" in cls.model_fields

    @property
    def dir_outs(self) -> list[str]:
        return [o for o in self.outs + self.plots if isinstance(o, str) and not Path(o).suffix]


def pipeline() -> list[Node]:
    """All DAG nodes, in topological order (the same nodes for every params file)."""
    nodes = [
        Node(
            "synth",
            f"localmim synth {RAW}",
            params=["synth"],
            deps=["localmim/synth"],
            outs=[raw(name) for name in DATASETS],
        ),
    ]
    nodes += dataset_nodes()
    for split in ("train", "val"):
        nodes.append(
            Node(
                f"shard_{split}",
                f"localmim shard {manifest('imagenet')} {shards(split)} --split {split}",
                params=["shard"],
                deps=[manifest("imagenet")],
                outs=[shards(split)],
                threads=2,
            )
        )
    nodes += pretrain_nodes()
    nodes += evaluation_nodes()
    nodes.append(analyze_node())
    nodes.append(segment_node())
    nodes.append(detect_node())
    nodes.append(summary_node(nodes))  # last: it reads every metrics file above
    return nodes


def dataset_nodes() -> list[Node]:
    """One manifest node per raw dataset: ``localmim dataset NAME data/raw`` describes the folder ``datasets.<name>``
    (or the embedded copy, synth's output, when that is empty) in ``data/raw/<name>.json`` and its file list, without
    reading or copying an image; the real dataset never becomes a DVC or Snakemake output.

    A change inside a folder outside the repository is seen only by scanning it: DVC reruns these stages on every
    ``dvc repro`` (``always_changed``; an unchanged manifest stops there), and Snakemake's trigger ``state`` is the
    folder's fingerprint, computed when the DAG is built (``dataset_state`` in workflow/rules/common.smk).
    """
    return [Node(f"dataset_{name}", f"localmim dataset {name} {RAW}",
                 params=[f"datasets.{name}", "datasets.fingerprint"], deps=[raw(name)],
                 outs=[manifest(name), f"{raw(name)}.files.tsv.gz"], always_changed=True,
                 smk_triggers={"state": f"lambda wildcards: dataset_state({name!r})"})
            for name in DATASETS]


def summary_node(nodes: list[Node]) -> Node:
    """The results table and plot of every stage's metrics (``localmim report --out reports``), for the Snakemake
    report and ``dvc plots show``; keep it last."""
    metrics = [m for n in nodes for m in n.metrics]
    return Node("summary", "localmim report --out reports", params=[], deps=metrics, outs=["reports/metrics.tsv"],
                plots=["reports/metrics.png"], report=["reports/metrics.tsv", "reports/metrics.png"])


def pretrain_nodes() -> list[Node]:
    """``targets`` and ``pretrain`` under torchrun; pretraining checkpoints (data/checkpoints/pretrain) are not
    declared outputs (DVC deletes outputs before a rerun; resuming needs them).

    ``targets`` writes view shards only with ``pretrain.data: views`` (on real data they are large); while the
    mode is ``online`` it writes a constant placeholder, so ``pretrain`` may always depend on ``data/views``: a
    changed ``targets.*`` param then reruns only the placeholder (DVC: same hash, pretraining not rerun;
    Snakemake: not even that, its trigger for the rule omits the targets section in online mode).
    """
    views_only = 'config["targets"] if config["pretrain"]["data"] == "views" else None'
    targets = Node("targets", f"localmim targets {shards('train')} {VIEWS} --placeholder-unless-views",
                   params=["targets", "pretrain.data"], deps=[shards("train")], outs=[VIEWS], threads=2,
                   smk_params={"targets": views_only, "pretrain.data": 'config["pretrain"]["data"]'})
    cmd = (f"localmim pretrain --out {ENCODER} --ckpt-dir {ckpt_dir('pretrain')} --metrics {metrics_file('pretrain')}"
           f" --imported {IMPORTED}")
    # data/shards/val: the kNN monitor's queries (pretrain.knn_every)
    pretrain = Node("pretrain", cmd, params=["pretrain"], deps=[shards("train"), VIEWS, shards("val"), IMPORTED],
                    outs=[ENCODER], metrics=[metrics_file("pretrain")], plots=[curves_dir(metrics_file("pretrain"))],
                    threads=2, launcher=TORCHRUN)
    return [targets, import_node(), pretrain]


def import_node() -> Node:
    """``localmim import`` of ``imported.source`` (a released checkpoint) into ``data/imported``; a constant
    placeholder while the source is null. ``pretrain`` always depends on it and, when it holds an encoder, copies it
    to ``data/pretrain`` instead of training, so the DAG starts from the import with the same nodes. The checkpoint
    lies outside the DAG: ``imported.sha256`` pins its bytes (a params key, hence a rerun trigger)."""
    return Node("import_encoder", f"localmim import --out {IMPORTED} --placeholder-unless-source",
                params=["imported"], outs=[IMPORTED])


def evaluation_nodes() -> list[Node]:
    """Fine-tuning (torchrun, one process per GPU) and the linear probe of the exported encoder ``data/pretrain``."""
    deps = [ENCODER, shards("train"), shards("val")]
    return [
        Node("finetune", f"localmim finetune --encoder {ENCODER} --out {out_dir('finetune')}", params=["finetune"],
             deps=deps, outs=[out_dir("finetune")], metrics=[metrics_file("finetune")],
             plots=[curves_dir(metrics_file("finetune"))], threads=2, launcher=TORCHRUN),
        Node("linprobe", f"localmim linprobe --encoder {ENCODER} --out {out_dir('linprobe')}", params=["linprobe"],
             deps=deps, outs=[out_dir("linprobe")], metrics=[metrics_file("linprobe")],
             plots=[curves_dir(metrics_file("linprobe"))], threads=2, one_gpu=True),
    ]


def analyze_node() -> Node:
    """Per-layer probe/kNN, attention NMI/distance and tap reconstructions of ``data/pretrain`` (the decoders come
    from the pre-training checkpoint recorded in ``encoder.json``, which is not a declared output)."""
    return Node("analyze", f"localmim analyze --encoder {ENCODER} --out {out_dir('analyze')}", params=["analyze"],
                deps=[ENCODER, shards("train"), shards("val")], outs=[out_dir("analyze")],
                metrics=[metrics_file("analyze")], plots=[ANALYZE_PLOTS], threads=2, one_gpu=True)


def detect_node() -> Node:
    """COCO detection / instance segmentation with Mask R-CNN on the exported encoder (torchrun, one process per
    GPU); its checkpoints (data/checkpoints/detect) are not declared."""
    return Node("detect", f"localmim detect --encoder {ENCODER} --data {manifest('coco')} --out {out_dir('detect')} "
                f"--ckpt-dir {ckpt_dir('detect')} --metrics {metrics_file('detect')}", params=["detect"],
                deps=[ENCODER, manifest("coco")], outs=[out_dir("detect")], metrics=[metrics_file("detect")],
                threads=2, launcher=TORCHRUN)


def segment_node() -> Node:
    """ADE20K semantic segmentation (method §9.1) on the exported encoder, under torchrun like fine-tuning."""
    return Node("segment", f"localmim segment --encoder {ENCODER} --data {manifest('ade20k')} --out "
                f"{out_dir('segment')}", params=["segment"], deps=[ENCODER, manifest("ade20k")],
                outs=[out_dir("segment")], metrics=[metrics_file("segment")], threads=2, launcher=TORCHRUN)


# The default experiments table (`make exps`): these params and the headline metrics of every stage
# (localmim.tracking.metrics).
KEY_PARAMS = ["pretrain.model", "pretrain.mask_ratio", "pretrain.epochs", "pretrain.data", "finetune.epochs"]


def exp_show_args() -> list[str]:
    """``dvc exp show`` arguments keeping Experiment, Created, :data:`KEY_PARAMS` and the headline metrics (the full
    table has one column per key of every section). DVC matches ``--keep`` regexes at the start of the column's
    name, which DVC shortens to the bare key when that is unique (else ``params.yaml:<key>``, ``<file>:<key>``)."""
    params = "|".join(re.escape(k) for k in KEY_PARAMS)
    from localmim.tracking.metrics import all_keys

    metrics = "|".join(re.escape(k) for k in all_keys())
    return ["--drop", ".*", "--keep", "Experiment$|Created$", "--keep", f"(params\\.yaml:)?({params})$",
            "--keep", f"(metrics/[^:]+:)?({metrics})$"]


if __name__ == "__main__":  # `python -m localmim.pipeline.dag exps [DVC ARGS]`: the readable experiments table
    if sys.argv[1:2] != ["exps"]:
        sys.exit("usage: python -m localmim.pipeline.dag exps [dvc exp show args...]")
    sys.exit(subprocess.call([sys.executable, "-m", "dvc", "exp", "show", *exp_show_args(), *sys.argv[2:]]))

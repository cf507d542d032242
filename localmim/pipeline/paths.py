"""The pipeline's paths, declared once (relative to the repository root): the defaults of the stage flags
(:func:`localmim.pipeline.stage.shared_flags` and the stages' own) and the nodes of the DAG
(:mod:`localmim.pipeline.dag`) both read them, so a stage run by hand writes where the DAG expects it.
"""

from __future__ import annotations

from pathlib import Path

RAW = "data/raw"  # the embedded datasets (synth) and the dataset manifests
VIEWS = "data/views"  # view shards (`localmim targets`)
IMPORTED = "data/imported"  # a released checkpoint as an encoder export (`localmim import`)
ANALYZE_PLOTS = "metrics/analyze_layers.csv"  # the per-block table of `localmim analyze`


def raw(name: str) -> str:
    """The embedded copy of dataset ``name`` (``imagenet``, ``ade20k``, ``coco``)."""
    return f"{RAW}/{name}"


def manifest(name: str) -> str:
    """The manifest of raw dataset ``name``: what every node reading it depends on (it names the dataset's root)."""
    return f"{RAW}/{name}.json"


def shards(split: str) -> str:
    """The ``split`` shards of ``localmim shard``."""
    return f"data/shards/{split}"


def out_dir(stage: str) -> str:
    """A stage's output directory (``--out``); ``out_dir("pretrain")`` is the exported encoder (``--encoder``)."""
    return f"data/{stage}"


def ckpt_dir(stage: str) -> str:
    """A stage's resumable checkpoints (``--ckpt-dir``), outside the DAG's declared outputs."""
    return f"data/checkpoints/{stage}"


def metrics_file(stage: str) -> str:
    """A stage's metrics file (``--metrics``)."""
    return f"metrics/{stage}.json"


def curves_dir(metrics: str | Path) -> str:
    """Where the runner writes the curves of a stage with the metrics file ``metrics`` (a DVC plots directory)."""
    return (Path(metrics).parent / "curves" / Path(metrics).stem).as_posix()


ENCODER = out_dir("pretrain")  # the exported encoder every downstream stage reads

"""The headline metrics of every stage, defined once.

Everything that shows "the result" of a stage reads this module: the MLflow tags copied onto the registered encoder
version (``mlflow_run``), ``localmim compare`` (table, bars and curves), ``localmim report`` and its plot
(``pipeline.results``) and the ``dvc exp show`` columns of ``make exps`` (``pipeline.dag``).
"""

from __future__ import annotations

from pathlib import Path

# Stage -> its headline metric keys, in display order. The stages are listed in DAG order.
HEADLINE: dict[str, tuple[str, ...]] = {
    "pretrain": ("final_loss",),  # + final_loss_tap<i> / final_loss_top (per decoder tap), see is_headline
    "finetune": ("top1",),
    "linprobe": ("top1",),
    "analyze": ("probe_top1_best", "knn_top1_best"),
    "segment": ("mIoU",),
    "detect": ("bbox_AP", "bbox_AP50", "segm_AP"),
}
STAGE_ORDER: tuple[str, ...] = tuple(HEADLINE)
# Metrics that are percentages (0-100): axis labels say "(%)".
PERCENT = {"top1", "mIoU", "probe_top1_best", "knn_top1_best"}
# COCO metrics as pycocotools reports them (0-1): `localmim report` shows them x100, in percent.
FRACTION = {"bbox_AP", "bbox_AP50", "segm_AP"}
# Stage -> headline metric -> the baselines that could beat it, as (key in the same metrics file, what it is). The
# stages write these keys (each a function of the data only); `localmim report` prints them next to the headline
# number (method §17, row 34). The randomly initialised encoder is measured in benchmarks/RESULTS.md, not per run.
BASELINES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "finetune": {"top1": (("chance_top1", "chance"),)},
    "linprobe": {"top1": (("chance_top1", "chance"),)},
    "analyze": {"probe_top1_best": (("chance_top1", "chance"),), "knn_top1_best": (("chance_top1", "chance"),)},
    "segment": {"mIoU": (("mIoU_majority", "most frequent class"), ("mIoU_chance", "uniform random class"))},
    "detect": {k: ((f"{k}_prior", "training boxes, image unseen"),) for k in ("bbox_AP", "bbox_AP50", "segm_AP")},
}
# Metrics logged per step during training (curves); the x axis is named by the stage's step unit (STEP_UNIT).
CURVE_KEYS = ("top1", "mIoU", "bbox_AP", "segm_AP")
# The unit of the ``step`` a stage logs its curves at (segment and detect step per iteration; pretraining logs
# per 1000-th of an epoch, see train/pretrain.py).
STEP_UNIT = {"pretrain": "epoch / 1000", "finetune": "epoch", "linprobe": "epoch", "segment": "iteration",
             "detect": "iteration"}


def is_headline(stage: str, key: str) -> bool:
    """True for the stage's headline keys, and for pretraining's per-tap final losses."""
    if key in HEADLINE.get(stage, ()):
        return True
    return stage == "pretrain" and (key.startswith("final_loss_tap") or key == "final_loss_top")


def headline_metrics(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{<stage>.<metric>: value}`` of the headline metrics present in ``metrics``."""
    return {f"{stage}.{k}": v for k, v in sorted(metrics.items()) if is_headline(stage, k)}


def encoder_tags(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a downstream stage copies onto the registered encoder version it used (bare keys)."""
    return {k: v for k, v in metrics.items() if is_headline(stage, k) and stage != "pretrain"}


def metric_order(col: str) -> tuple[int, int, str]:
    """Sort key of ``<stage>.<metric>`` columns: DAG order of the stage, then the headline order."""
    stage, _, key = col.partition(".")
    si = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    keys = HEADLINE.get(stage, ())
    return si, keys.index(key) if key in keys else len(keys), col


def all_keys() -> list[str]:
    """Every headline key once (``dvc exp show --keep`` columns)."""
    return list(dict.fromkeys(k for keys in HEADLINE.values() for k in keys))


def axis_label(key: str) -> str:
    return f"{key} (%)" if key in PERCENT else f"{key} (0-1)" if key in FRACTION else key


def as_percent(key: str, value: float) -> float:
    """``value`` of metric ``key`` in percent (COCO's 0-1 metrics x100; the others unchanged)."""
    return 100.0 * value if key in FRACTION else value


def baselines(stage: str, key: str) -> tuple[tuple[str, str], ...]:
    """``((baseline key, what it is), ...)`` of headline metric ``key`` of ``stage`` (empty: none defined)."""
    return BASELINES.get(stage, {}).get(key, ())


# Measurements of the run rather than results of the computation: times, rates, memory. They differ between two
# runs of the same inputs, params and code, so they stay out of the DVC-tracked metrics file (a rerun with the same
# results must leave it, and the summary node reading it, unchanged): MLflow and ``<metrics>.timing.json`` only.
_MEASUREMENT_SUFFIXES = ("seconds", "_per_s", "_per_s_compute", "data_wait_frac", "peak_mem_mb")


def is_measurement(key: str) -> bool:
    return key.endswith(_MEASUREMENT_SUFFIXES)


def split_measurements(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``(results, measurements)`` of a stage's metrics (see :func:`is_measurement`)."""
    results = {k: v for k, v in metrics.items() if not is_measurement(k)}
    return results, {k: v for k, v in metrics.items() if is_measurement(k)}


def timing_path(metrics_path: str | Path) -> Path:
    """``metrics/pretrain.json`` -> ``metrics/pretrain.timing.json`` (git-ignored, not a DVC output)."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}{TIMING_SUFFIX}")


TIMING_SUFFIX = ".timing.json"

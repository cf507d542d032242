"""The cluster side of ``localmim plan``: per stage the GPUs, per-device batch, accumulation and chained jobs.

Given ``--nodes`` x ``--gpus-per-node`` GPUs of ``--gpu-mem`` GiB and a job time limit:

* **Per-device batch** of a stage with a ``global_batch`` (pretrain, finetune, segment, detect): the largest divisor
  of ``global_batch / GPUs`` that fits the memory estimate below; the accumulation is the section's own
  ``accum_for(world)``. A global batch that the GPU count does not divide is refused, naming both numbers (pretrain,
  finetune); ``segment`` and ``detect``, whose global batches are small (method §9: 16 and 64), run on the largest
  GPU count of the cluster that divides theirs (GPUs of one node, or whole nodes), at most one image per GPU less.
  ``linprobe`` and ``analyze`` run on one GPU.
* **Memory (an estimate, not a measurement):** device memory taken as proportional to the per-device batch and
  calibrated on a batch the reference is known to have run (method §7-§9.1: e.g. 256 ViT-B pre-training images per
  V100-32GB): ``max batch = floor(reference batch x GiB / reference GiB)``. The fixed part (fp32 weights,
  gradients and AdamW moments: 16 bytes per parameter, 1.4 GiB for ViT-B's 90M, method §16) is counted as if it
  scaled with the batch, so the estimate errs on the safe side above the reference's 32 GiB and is up to ~5 %
  optimistic below it; the reference need not have filled its GPUs, which errs on the safe side again.
* **Chained jobs:** a stage longer than the time limit runs as jobs that each resume from the newest checkpoint
  (``snakemake --retries``). Each job pays a restart (``--restart-minutes``, an assumption: start-up, checkpoint
  load, data-loader warm-up) and, when cut by the limit, loses the work since its last checkpoint (at most the
  stage's checkpoint interval ``C``: ``ckpt_every`` and ``ckpt_minutes`` from its params). Worst case,
  ``jobs = 1 + ceil((wall - (limit - restart)) / (limit - restart - C))`` (1 when ``wall + restart <= limit``), and
  the wall time printed is the compute time plus ``jobs x restart + (jobs - 1) x C``. A stage without resumable
  checkpoints (linprobe, analyze) must fit one job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from localmim.config import all_sections


class PlanError(ValueError):
    """The cluster cannot run the params' recipe as given; the message names the numbers."""


@dataclass(frozen=True)
class Fit:
    batch: int  # images per device the reference ran ...
    gib: float  # ... on a GPU of this much memory
    source: str

    def gib_per_image(self) -> float:
        return self.gib / self.batch


_V100 = "the reference's V100-32GB"
MEMORY: dict[tuple[str, str], Fit] = {
    ("pretrain", "vit_base"): Fit(256, 32, f"method §7: 256 ViT-B/16 images per GPU on {_V100}"),
    ("pretrain", "vit_large"): Fit(128, 32, f"method §7: 128 ViT-L/16 images per GPU (x4 accumulation) on {_V100}"),
    ("pretrain", "swin_base"): Fit(256, 32, f"method §7: 256 Swin-B images per GPU on {_V100}"),
    ("finetune", "vit_base"): Fit(128, 32, "method §8: 128 ViT-B images per GPU; the 8 V100 of method §12, assumed "
                                           "the 32 GB ones of §7"),
    ("finetune", "vit_large"): Fit(64, 32, "method §8: 64 ViT-L images per GPU (x2 accumulation), V100 assumed 32 GB"),
    ("finetune", "swin_base"): Fit(128, 32, "method §8: 128 Swin-B images per GPU, V100 assumed 32 GB"),
    ("segment", "vit_base"): Fit(2, 32, "method §9.1: 2 crops of 512 px per GPU; GPU not stated, assumed a V100-32GB "
                                        "(a loose bound: the batch was set by the recipe, not by memory)"),
    ("segment", "swin_base"): Fit(2, 32, "method §9.1: 2 crops of 512 px per GPU; GPU not stated, assumed a "
                                         "V100-32GB (a loose bound)"),
}  # fmt: skip
GLOBAL_BATCH_STAGES = ("pretrain", "finetune", "segment", "detect")  # a fixed global batch on any GPU count
DENSE_STAGES = ("segment", "detect")  # small global batches: the GPUs that divide it, not necessarily all
SINGLE_GPU_STAGES = ("linprobe", "analyze")
MULTI_NODE_STAGES = ("pretrain",)  # `pretrain.nnodes`: the one rule that spans nodes; the others are one-node jobs


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int | None = None  # None: each stage's own nproc_per_node (one node)
    gpu_mem: float = 32.0  # GiB per GPU; default the reference's V100-32GB
    time_limit_h: float | None = None  # None: the stage's cluster.rules.<stage>.runtime (else cluster.default)
    restart_h: float = 5 / 60


def parse_time_limit(text: str) -> float:
    """Hours of a job time limit: ``24h``, ``90m``, ``2d``, ``1d12h``, ``1.5h``, SLURM's ``[D-]HH:MM[:SS]``, or a
    bare number of minutes (SLURM's ``-t`` and ``cluster.*.runtime``)."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        hours = float(t) / 60
    elif re.fullmatch(r"(\d+(\.\d+)?[dhm])+", t):
        unit = {"d": 24.0, "h": 1.0, "m": 1 / 60}
        hours = sum(float(n) * unit[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([dhm])", t))
    elif m := re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", t):
        d, h, mi, s = (int(x) if x else 0 for x in m.groups())
        hours = 24 * d + h + mi / 60 + s / 3600
    else:
        raise PlanError(f"--time-limit {text!r}: expected e.g. 24h, 90m, 2d, 1d12h, 72:00:00, 3-00:00:00 or minutes")
    if hours <= 0:
        raise PlanError(f"--time-limit {text!r}: must be positive")
    return hours


def world(stage: str, section: dict[str, Any], cluster: Cluster) -> int:
    """GPUs (processes) of ``stage`` on ``cluster`` (1 for a CPU stage when no cluster is given)."""
    if stage in SINGLE_GPU_STAGES:
        return 1
    if cluster.gpus_per_node is None:
        return cluster.nodes * section["nproc_per_node"] if section.get("device") != "cpu" else 1
    nodes = cluster.nodes if stage in MULTI_NODE_STAGES else 1
    if stage in DENSE_STAGES:
        return dividing_gpus(section["global_batch"], replace(cluster, nodes=nodes))
    return nodes * cluster.gpus_per_node


def dividing_gpus(global_batch: int, cluster: Cluster) -> int:
    """The largest GPU count of ``cluster`` that divides ``global_batch``: up to one node's GPUs, or whole nodes."""
    per = cluster.gpus_per_node or 1
    counts = [*range(1, per + 1), *(k * per for k in range(2, cluster.nodes + 1))]
    return max(n for n in counts if global_batch % n == 0)


def max_batch(stage: str, fam: str | None, gib: float) -> int | None:
    """The largest per-device batch the memory estimate allows (None: no reference figure for this stage/model)."""
    fit = MEMORY.get((stage, fam))
    if fit is None:
        return None
    cap = math.floor(gib / fit.gib_per_image() + 1e-9)
    if cap < 1:
        raise PlanError(f"{stage}: by the memory estimate not even 1 image per GPU fits {gib:g} GiB "
                        f"({fit.gib_per_image():.3g} GiB per image from {fit.source})")
    return cap


def device_batch(stage: str, section: dict[str, Any], n: int, cap: int | None) -> tuple[int, int]:
    """(per-device batch, accumulation) of a global-batch stage on ``n`` GPUs: the largest divisor of
    ``global_batch / n`` within ``cap`` (else within the params' ``batch_size``), accumulation from ``accum_for``."""
    g = section["global_batch"]
    if g % n:
        near = sorted({d for d in range(1, 4 * n + 1) if g % d == 0}, key=lambda d: (abs(d - n), d))[:2]
        raise PlanError(f"{stage}.global_batch={g} is not a multiple of the {n} GPUs: {g} / {n} = {g / n:g} images "
                        f"per GPU; use a GPU count that divides {g} (nearest: {' or '.join(map(str, sorted(near)))})")
    per = g // n
    limit = cap if cap is not None else section["batch_size"]
    batch = max(d for d in range(1, min(per, limit) + 1) if per % d == 0)
    # the section itself derives the accumulation (validated as if one node held all n processes)
    cfg = all_sections()[stage].model_validate({**section, "batch_size": batch, "nproc_per_node": n})
    return batch, cfg.accum_for(n)


def accum(stage: str, section: dict[str, Any], n: int) -> int:
    """The section's own accumulation on ``n`` processes at its ``batch_size``."""
    return all_sections()[stage].model_validate(section).accum_for(n)


def checkpoint_hours(stage: str, section: dict[str, Any], wall_h: float) -> float | None:
    """Wall hours between two resumable checkpoints of ``stage``: every ``ckpt_every`` epochs (segment: iterations)
    and, where the section has it, every ``ckpt_minutes``; None: the stage has none, it must fit one job."""
    if stage not in ("pretrain", "finetune", "segment", "detect"):
        return None
    every = section["ckpt_every"] * wall_h / section["iters" if stage == "segment" else "epochs"]
    minutes = section.get("ckpt_minutes", 0)
    return min(every, minutes / 60) if minutes > 0 else every


def jobs(wall_h: float, ckpt_h: float | None, limit_h: float, restart_h: float) -> tuple[int | None, float]:
    """(chained jobs, wall hours with restarts and lost work) for ``wall_h`` hours of compute, worst case: every job
    pays ``restart_h``, every job cut by the limit loses ``ckpt_h``; (None, compute hours) when it cannot finish (no
    checkpoint and longer than one job, or a checkpoint interval that leaves no progress per job)."""
    if wall_h + restart_h <= limit_h:
        return 1, wall_h + restart_h
    usable = limit_h - restart_h - (ckpt_h if ckpt_h is not None else limit_h)  # per cut job
    if usable <= 0:
        return None, wall_h
    n = 1 + math.ceil((wall_h - (limit_h - restart_h)) / usable - 1e-9)  # the last job is not cut
    return n, wall_h + n * restart_h + (n - 1) * ckpt_h

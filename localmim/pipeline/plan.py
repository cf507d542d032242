"""``localmim plan``: what the DAG will process and cost, per stage, before it runs.

Images per stage follow from the recipe in params (epochs or iterations x batch, evaluations, feature passes) and
the dataset sizes: from the manifests ``data/raw/<name>.json`` when they describe the configured dataset, else the
official sizes for a dataset given by path, else the synth params for the embedded data. Device-hours are images
divided by an images/s per device. Every rate says where it comes from: the reference's measured GPU-hours per
epoch (method §7), ``benchmarks/RESULTS.md``, or a stated assumption; ``--ips STAGE=N`` replaces one with your own
(MLflow logs the images/s of every stage, e.g. after pretraining's first epoch).

For the cluster the user has (``--nodes``, ``--gpus-per-node``, ``--gpu-mem``, ``--time-limit``) each GPU stage also
gets its per-device batch, accumulation, memory estimate and chained jobs: :mod:`localmim.pipeline.cluster_plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmim.config import ParamsError, apply_overrides, read_params_file, validate_all
from localmim.pipeline import cluster_plan as cp
from localmim.pipeline import paths

IMAGENET_TRAIN = 1_281_167
OFFICIAL = {"imagenet": (IMAGENET_TRAIN, 50_000), "ade20k": (20_210, 2_000), "coco": (118_287, 5_000)}
TRAIN_STEP = 3.0  # assumption: a training step costs about 3 forward passes (backward ~ 2 forwards)


@dataclass(frozen=True)
class Rate:
    ips: float  # images/s per device
    device: str
    source: str


def _reference(gpu_h_per_epoch: float, what: str) -> Rate:
    return Rate(IMAGENET_TRAIN / (gpu_h_per_epoch * 3600), "V100",
                f"method §7: the reference's {gpu_h_per_epoch} GPU-hours per ImageNet epoch ({what}; the authors' "
                f"measurement on 8 V100)")  # fmt: skip


_DEIT = "DeiT (Touvron et al. 2021) Table 1: ViT-B/16 at 224 px, 292 images/s inference on one V100"
_SWIN = "Swin (Liu et al. 2021) Table 1: Swin-B at 224 px, 278 images/s inference on one V100"
_VIT_L = "ViT-B's 292 images/s x 17.6/61.6 GFLOPs (ViT-L/16)"
# Forward-only rates at the pretraining resolution (feature passes, evaluation): linprobe, analyze, kNN, finetune eval.
INFER = {
    "vit_base": Rate(292, "V100", f"{_DEIT} (stated)"),
    "vit_large": Rate(292 * 17.6 / 61.6, "V100", f"assumption: {_VIT_L}"),
    "swin_base": Rate(278, "V100", f"{_SWIN} (stated)"),
}
RATES: dict[tuple[str, str], Rate] = {
    ("pretrain", "vit_base"): _reference(0.7, "ViT-B"),
    ("pretrain", "vit_large"): _reference(1.0, "ViT-L"),
    ("pretrain", "swin_base"): _reference(1.1, "Swin-B, HOG"),
    ("pretrain", "vit_tiny_p8"): Rate(98.44, "CPU (2 cores)", "benchmarks/RESULTS.md bench_models: "
                                       "localmim_vit_tiny_patch8, 64 px, batch 32, fp32 step (measured)"),
    ("finetune", "vit_base"): Rate(292 / TRAIN_STEP, "V100", f"assumption: 1/3 of {_DEIT}"),
    ("finetune", "vit_large"): Rate(292 * 17.6 / 61.6 / TRAIN_STEP, "V100", f"assumption: 1/3 of {_VIT_L}"),
    ("finetune", "swin_base"): Rate(278 / TRAIN_STEP, "V100", f"assumption: 1/3 of {_SWIN}"),
    ("segment", "vit_base"): Rate(4.0, "V100", "assumption (not measured): UperNet on ViT-B at 512 px crops, ~5x "
                                  "the tokens of 224 px plus the UPerHead at stride 4"),
    ("segment", "swin_base"): Rate(5.0, "V100", "assumption (not measured): UperNet on Swin-B at 512 px crops"),
    ("detect", "vit_base"): Rate(2.5, "V100", "assumption (not measured): ViTDet Mask R-CNN on ViT-B at 1024 px "
                                 "(~21x the pixels of 224 px, windowed attention)"),
    ("detect", "swin_base"): Rate(4.0, "V100", "assumption (not measured): Mask R-CNN FPN on Swin-B at 480-800 px "
                                  "short side"),
}  # fmt: skip


def family(model: str) -> str | None:
    """The backbone family of a pretrain.model name (the key of :data:`RATES`)."""
    for key, fam in (("vit_base", "vit_base"), ("vit_large", "vit_large"), ("swin_base", "swin_base"),
                     ("vit_tiny_patch8", "vit_tiny_p8")):  # fmt: skip
        if key in model:
            return fam
    return None


def dataset_sizes(tree: dict[str, Any], raw: Path) -> dict[str, tuple[int, int, str]]:
    """(train, val, where from) per dataset."""
    ds, synth = tree["datasets"], tree["synth"]
    embedded = {"imagenet": (synth["num_classes"] * synth["train_per_class"], synth["num_classes"] * synth[
        "val_per_class"]), "ade20k": (synth["seg_train"], synth["seg_val"]), "coco": (synth["coco_train"],
                                                                                      synth["coco_val"])}  # fmt: skip
    out = {}
    for name, official in OFFICIAL.items():
        root = ds[name]
        try:
            man = json.loads((raw / f"{name}.json").read_text())
            if man["root"] == (root or str(raw / name)):
                sp = man["splits"]
                out[name] = (sp["train"]["num_images"], sp["val"]["num_images"], f"manifest {raw / name}.json")
                continue
        except (OSError, ValueError, KeyError):
            pass
        out[name] = (*official, f"official size of {root}") if root else (*embedded[name], "embedded (synth params)")
    return out


@dataclass
class Placement:
    """How a GPU stage runs on the cluster (``cluster_plan``)."""

    batch: int  # per device
    accum: int | None  # micro-batches per optimizer step (None: the stage has no global batch)
    global_batch: int | None
    mem_gib: float | None  # memory estimate per device (None: no reference figure)
    jobs: int | None  # chained jobs (None: it cannot finish within the time limit)
    wall_h: float | None  # wall hours with restarts and lost work
    limit_h: float
    ckpt_h: float | None


@dataclass
class Work:
    stage: str
    images: int  # images through the model (training and forward passes)
    hours: float | None  # device-hours
    devices: int
    sources: list[str]
    run: Placement | None = None


def _work(stage: str, devices: int, parts: list[tuple[int, Rate | None, float]]) -> Work:
    """``parts``: (images, rate, cost factor: 1 for the rate's own kind of pass, 1/TRAIN_STEP for a forward pass at
    a training rate)."""
    images = sum(n for n, _, _ in parts)
    known = [(n, r, f) for n, r, f in parts if n]
    hours = None if any(r is None for _, r, _ in known) else sum(n * f / r.ips for n, r, f in known) / 3600
    sources = sorted({r.source for _, r, _ in known if r is not None})
    return Work(stage, images, hours, devices, sources)


def _limit_h(tree: dict[str, Any], stage: str, cluster: cp.Cluster) -> float:
    if cluster.time_limit_h is not None:
        return cluster.time_limit_h
    c = tree["cluster"]
    return (c["rules"].get(stage) or c["default"])["runtime"] / 60


def place(tree: dict[str, Any], w: Work, fam: str | None, cluster: cp.Cluster) -> Placement:
    """Per-device batch, accumulation, memory estimate and chained jobs of GPU stage ``w`` (see ``cluster_plan``)."""
    sec = tree[w.stage]
    fit = cp.MEMORY.get((w.stage, fam))
    if w.stage in cp.GLOBAL_BATCH_STAGES:
        batch, accum = cp.device_batch(w.stage, sec, w.devices, cp.max_batch(w.stage, fam, cluster.gpu_mem))
        glob = sec["global_batch"]
    elif w.stage == "linprobe":  # one process on cached features
        batch, accum, glob = sec["batch_size"], cp.accum(w.stage, sec, 1), sec["global_batch"]
    else:
        batch, accum, glob = sec["batch_size"], None, None
    limit = _limit_h(tree, w.stage, cluster)
    wall = None if w.hours is None else w.hours / w.devices
    ckpt = None if wall is None else cp.checkpoint_hours(w.stage, sec, wall)
    n, total = (None, None) if wall is None else cp.jobs(wall, ckpt, limit, cluster.restart_h)
    mem = None if fit is None else batch * fit.gib_per_image()
    if fit is not None:
        w.sources.append(f"memory estimate: {fit.gib_per_image():.4g} GiB per image ({fit.source}; proportional "
                         f"to the batch, see localmim/pipeline/cluster_plan.py)")
    return Placement(batch, accum, glob, mem, n, total, limit, ckpt)


def plan(tree: dict[str, Any], raw: Path, ips: dict[str, float],
         cluster: cp.Cluster | None = None) -> tuple[list[Work], dict]:
    """The stages' work; ``cluster`` (default: each stage's own ``nproc_per_node`` on one node, 32 GiB GPUs, the
    ``cluster`` section's time limits) places each GPU stage (:class:`Placement`)."""
    cluster = cluster or cp.Cluster()
    sizes = dataset_sizes(tree, raw)
    fam = family(tree["pretrain"]["model"])
    own = {s: Rate(v, "device", "--ips (given)") for s, v in ips.items()}
    rate = lambda s: own.get(s) or RATES.get((s, fam))  # noqa: E731
    infer = own.get("infer") or INFER.get(fam)
    if infer is None and rate("pretrain") is not None:  # a forward pass costs 1/TRAIN_STEP of a training step
        r = rate("pretrain")
        infer = Rate(r.ips * TRAIN_STEP, r.device, f"assumption: {TRAIN_STEP:g}x the pretraining rate ({r.source})")
    (n_tr, n_va, _), a_va, (c_tr, c_va, _) = sizes["imagenet"], sizes["ade20k"][1], sizes["coco"]
    p, f, s, d = tree["pretrain"], tree["finetune"], tree["segment"], tree["detect"]
    world = lambda st: cp.world(st, tree[st], cluster)  # noqa: E731
    batch = p["global_batch"]
    knn = (p["epochs"] // p["knn_every"]) * (min(p["knn_train"], n_tr) + min(p["knn_val"], n_va)) if p[
        "knn_every"] else 0  # fmt: skip
    seg_train = s["iters"] * s["global_batch"]
    det_train = d["epochs"] * (c_tr // d["global_batch"]) * d["global_batch"]  # drop-last at the global batch
    seg_eval = (s["iters"] // s["eval_every"] if s["eval_every"] else 1) * a_va
    det_eval = (d["epochs"] // d["eval_every"] if d["eval_every"] else 1) * c_va
    a = tree["analyze"]
    works = [
        Work("shard_train + shard_val (CPU)", n_tr + n_va, None, 0, []),
        Work("targets (CPU)", n_tr * tree["targets"]["views"] if p["data"] == "views" else 0, None, 0, []),
        _work("pretrain", world("pretrain"), [(p["epochs"] * (n_tr // batch) * batch, rate("pretrain"), 1),
                                              (knn, infer, 1)]),
        _work("finetune", world("finetune"), [(f["epochs"] * n_tr, rate("finetune"), 1),
                                              (f["epochs"] * n_va, infer, 1)]),
        _work("linprobe", 1, [(n_tr + n_va, infer, 1)]),
        _work("analyze", 1, [((a["probe_train"] or n_tr) + (a["probe_val"] or n_va) + a["attn_images"], infer, 1)]),
        _work("segment", world("segment"), [(seg_train, rate("segment"), 1),
                                            (seg_eval, rate("segment"), 1 / TRAIN_STEP)]),
        _work("detect", world("detect"), [(det_train, rate("detect"), 1),
                                          (det_eval, rate("detect"), 1 / TRAIN_STEP)]),
    ]  # fmt: skip
    for w in works:
        if w.devices:
            w.run = place(tree, w, fam, cluster)
    return works, sizes


def _h(hours: float) -> str:
    return f"{hours:,.1f}" if hours >= 1 else f"{hours:.3f}"


_COLS = (("stage", 31), ("images", 15), ("devices", 7), ("batch/GPU", 9), ("accum", 5), ("global", 7),
         ("GiB/GPU", 7), ("device-hours", 12), ("wall hours", 10), ("jobs", 4))  # fmt: skip


def _fmt(cells: list) -> str:
    """One table line: the stage left-aligned, every other cell right-aligned to its column's width."""
    return " ".join(f"{c:>{n}}" if i else f"{c:<{n}}" for i, (c, (_, n)) in enumerate(zip(cells, _COLS, strict=True)))


def _row(w: Work, refs: str) -> str:
    r, dash = w.run, "-"
    hours = dash if not w.devices else ("?" if w.hours is None else _h(w.hours))
    if r is None:
        return f"{_fmt([w.stage, f'{w.images:,}', dash, dash, dash, dash, dash, hours, dash, dash])}  {refs}".rstrip()
    mem = dash if r.mem_gib is None else f"{r.mem_gib:.1f}"
    wall, jobs = ("?", "?") if r.wall_h is None and w.hours is None else (_h(r.wall_h or 0), r.jobs or "!")
    cells = [w.stage, f"{w.images:,}", w.devices, r.batch, r.accum or dash, r.global_batch or dash, mem, hours,
             wall, jobs]  # fmt: skip
    return f"{_fmt(cells)}  {refs}".rstrip()


def _cluster_line(cluster: cp.Cluster) -> str:
    gpus = ("each stage's own nproc_per_node" if cluster.gpus_per_node is None else
            f"{cluster.nodes} node{'s' * (cluster.nodes > 1)} x {cluster.gpus_per_node} GPUs")  # fmt: skip
    limit = ("cluster.rules.<stage>.runtime" if cluster.time_limit_h is None else f"{_h(cluster.time_limit_h)} h")
    return (f"cluster: {gpus}, {cluster.gpu_mem:g} GiB each; job time limit {limit}; restart "
            f"{cluster.restart_h * 60:g} min per job (assumption)")


def _advice(works: list[Work], tree: dict[str, Any], cluster: cp.Cluster) -> list[str]:
    """Warnings (memory, jobs that cannot finish) and the overrides that run this plan."""
    out, sets = [], []
    for w in (w for w in works if w.run is not None):
        r, sec = w.run, tree[w.stage]
        if r.mem_gib is not None and r.mem_gib > cluster.gpu_mem:
            out.append(f"! {w.stage}: batch_size {r.batch} needs ~{r.mem_gib:.0f} GiB per GPU by the estimate, more "
                       f"than {cluster.gpu_mem:g}: lower {w.stage}.batch_size")
        if r.jobs is None and r.wall_h is not None:
            why = "has no resumable checkpoint" if r.ckpt_h is None else f"checkpoints every {_h(r.ckpt_h)} h"
            out.append(f"! {w.stage}: {_h(r.wall_h)} h of compute {why} and cannot finish in {_h(r.limit_h)} h jobs: "
                       f"raise the time limit")
        if w.stage == "segment" and r.batch * w.devices < 2:  # train/segment.py refuses it (check_batch_norm)
            out.append(f"! segment: 1 crop on 1 GPU leaves UperNet's BatchNorm one value per channel: it needs "
                       f"~{2 * (r.mem_gib or 0):.0f} GiB for 2 crops, or 2+ GPUs (SyncBatchNorm)")
        gpus = None if cluster.gpus_per_node is None else cluster.nodes * cluster.gpus_per_node
        if w.stage in cp.DENSE_STAGES and gpus is not None and w.devices < cluster.gpus_per_node:
            out.append(f"{w.stage}: global batch {r.global_batch} on {w.devices} of a node's {cluster.gpus_per_node} "
                       f"GPUs (the most that divide it)")
        if w.stage in cp.GLOBAL_BATCH_STAGES and r.batch != sec["batch_size"]:
            sets.append(f"--set {w.stage}.batch_size={r.batch}")
        per_node = None if gpus is None else min(w.devices, cluster.gpus_per_node)
        if per_node is not None and w.stage not in cp.SINGLE_GPU_STAGES and sec["nproc_per_node"] != per_node:
            sets.append(f"--set {w.stage}.nproc_per_node={per_node}")
    if cluster.nodes > 1:
        sets.append(f"--set pretrain.nnodes={cluster.nodes}")
        out.append(f"{cluster.nodes} nodes: pretraining spans them (pretrain.nnodes, one rule: docs/reproducing.md, "
                   "Multi-node pretraining); the other training rules are one-node jobs")
    if sets:
        out.append("params for this cluster: " + " ".join(sets))
    return out


def render(works: list[Work], sizes: dict, model: str, tree: dict[str, Any] | None = None,
           cluster: cp.Cluster | None = None) -> str:
    cluster = cluster or cp.Cluster()
    lines = ["datasets: " + "; ".join(f"{k} {tr:,} train / {va:,} val ({src})" for k, (tr, va, src) in sizes.items()),
             f"backbone: {model}", _cluster_line(cluster), "", f"{_fmt([c for c, _ in _COLS])}  sources"]
    notes: list[str] = []
    for w in works:
        for src in w.sources:
            if src not in notes:
                notes.append(src)
        lines.append(_row(w, " ".join(f"[{notes.index(src) + 1}]" for src in w.sources)))
    total = sum(w.hours or 0 for w in works)
    lines += [_fmt(["total (known rates)", "", "", "", "", "", "", _h(total), "", ""]).rstrip(), ""]
    lines += [f"[{i}] {src}" for i, src in enumerate(notes, 1)]
    lines += ["device-hours: compute at the rates above, on the device each names (--ips for yours); wall hours: "
              "device-hours / GPUs plus, per chained job, the restart and (cut jobs) the work since the last "
              "checkpoint, worst case (localmim/pipeline/cluster_plan.py)"]
    if any(w.devices and w.hours is None for w in works):
        lines.append(f"?: no rate for this stage with {model}; give one with --ips STAGE=IMAGES_PER_S")
    return "\n".join(lines + (_advice(works, tree, cluster) if tree is not None else []))


def _ips(kv: str) -> tuple[str, float]:
    stage, _, value = kv.partition("=")
    try:
        rate = float(value)
    except ValueError:
        rate = 0.0
    if stage not in ("pretrain", "finetune", "segment", "detect", "infer") or rate <= 0:
        raise ValueError(f"--ips {kv!r}: expected STAGE=IMAGES_PER_S with STAGE one of pretrain, finetune, segment, "
                         f"detect, infer and a positive rate")
    return stage, rate


def main(args: argparse.Namespace) -> int:
    try:
        tree = apply_overrides(read_params_file(args.params), args.overrides)
        tree = {k: v.to_dict() for k, v in validate_all(tree, source=args.params).items()}
        ips = dict(_ips(kv) for kv in args.ips)
        cluster = _cluster(args)
        works, sizes = plan(tree, Path(args.raw), ips, cluster)
    except (ParamsError, ValueError) as e:  # cluster_plan.PlanError is a ValueError
        print(f"localmim plan: error: {e}", file=sys.stderr)
        return 2
    print(render(works, sizes, tree["pretrain"]["model"], tree, cluster))
    return 0


def _cluster(args: argparse.Namespace) -> cp.Cluster:
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node), ("--gpu-mem", args.gpu_mem),
                        ("--restart-minutes", args.restart_minutes + 1)):  # fmt: skip
        if value is not None and value <= 0:
            raise cp.PlanError(f"{flag} {value:g}: must be positive")
    if args.nodes > 1 and args.gpus_per_node is None:
        raise cp.PlanError(f"--nodes {args.nodes}: give --gpus-per-node too")
    limit = None if args.time_limit is None else cp.parse_time_limit(args.time_limit)
    return cp.Cluster(args.nodes, args.gpus_per_node, args.gpu_mem, limit, args.restart_minutes / 60)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", default=paths.RAW, help="folder of the dataset manifests (default: %(default)s)")
    p.add_argument("--ips", action="append", default=[], metavar="STAGE=N",
                   help="images/s per device for STAGE (pretrain, finetune, segment, detect, or infer for forward "
                        "passes), e.g. measured in MLflow; repeatable")
    g = p.add_argument_group("cluster", "the GPUs you have (localmim/pipeline/cluster_plan.py: batch, memory, jobs)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: each stage's nproc_per_node)")
    g.add_argument("--gpu-mem", type=float, default=32.0, metavar="GIB",
                   help="memory per GPU in GiB (default: %(default)g, the reference's V100-32GB)")
    g.add_argument("--time-limit", metavar="T", help="job time limit, e.g. 24h, 2d, 72:00:00 (default: the cluster "
                                                     "section's runtime of each rule)")
    g.add_argument("--restart-minutes", type=float, default=5.0,
                   help="cost of each job's start (start-up, checkpoint load, loader warm-up; default %(default)g, an "
                        "assumption)")

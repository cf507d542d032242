"""``localmim plan``: what the DAG will process and cost, per stage, before it runs.

Images per stage follow from the recipe in params (epochs or iterations x batch, evaluations, feature passes) and
the dataset sizes: from the manifests ``data/raw/<name>.json`` when they describe the configured dataset, else the
official sizes for a dataset given by path, else the synth params for the embedded data. Device-hours are images
divided by an images/s per device. Every rate says where it comes from: the reference's measured GPU-hours per
epoch (method §7), ``benchmarks/RESULTS.md``, or a stated assumption; ``--ips STAGE=N`` replaces one with your own
(MLflow logs the images/s of every stage, e.g. after pretraining's first epoch).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmim.config import ParamsError, apply_overrides, read_params_file, validate_all
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
class Work:
    stage: str
    images: int  # images through the model (training and forward passes)
    hours: float | None  # device-hours
    devices: int
    sources: list[str]


def _work(stage: str, devices: int, parts: list[tuple[int, Rate | None, float]]) -> Work:
    """``parts``: (images, rate, cost factor: 1 for the rate's own kind of pass, 1/TRAIN_STEP for a forward pass at
    a training rate)."""
    images = sum(n for n, _, _ in parts)
    known = [(n, r, f) for n, r, f in parts if n]
    hours = None if any(r is None for _, r, _ in known) else sum(n * f / r.ips for n, r, f in known) / 3600
    sources = sorted({r.source for _, r, _ in known if r is not None})
    return Work(stage, images, hours, devices, sources)


def plan(tree: dict[str, Any], raw: Path, ips: dict[str, float]) -> tuple[list[Work], dict]:
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
    world = lambda c: c["nproc_per_node"] if c.get("device") != "cpu" else 1  # noqa: E731
    batch = p["global_batch"]
    knn = (p["epochs"] // p["knn_every"]) * (min(p["knn_train"], n_tr) + min(p["knn_val"], n_va)) if p[
        "knn_every"] else 0  # fmt: skip
    seg_train = s["iters"] * s["batch_size"] * world(s)
    seg_eval = (s["iters"] // s["eval_every"] if s["eval_every"] else 1) * a_va
    det_eval = (d["epochs"] // d["eval_every"] if d["eval_every"] else 1) * c_va
    a = tree["analyze"]
    works = [
        Work("shard_train + shard_val (CPU)", n_tr + n_va, None, 0, []),
        Work("targets (CPU)", n_tr * tree["targets"]["views"] if p["data"] == "views" else 0, None, 0, []),
        _work("pretrain", world(p), [(p["epochs"] * (n_tr // batch) * batch, rate("pretrain"), 1), (knn, infer, 1)]),
        _work("finetune", world(f), [(f["epochs"] * n_tr, rate("finetune"), 1), (f["epochs"] * n_va, infer, 1)]),
        _work("linprobe", 1, [(n_tr + n_va, infer, 1)]),
        _work("analyze", 1, [((a["probe_train"] or n_tr) + (a["probe_val"] or n_va) + a["attn_images"], infer, 1)]),
        _work("segment", world(s), [(seg_train, rate("segment"), 1), (seg_eval, rate("segment"), 1 / TRAIN_STEP)]),
        _work("detect", world(d), [(d["epochs"] * c_tr, rate("detect"), 1),
                                   (det_eval, rate("detect"), 1 / TRAIN_STEP)]),
    ]  # fmt: skip
    return works, sizes


def _h(hours: float) -> str:
    return f"{hours:,.1f}" if hours >= 1 else f"{hours:.3f}"


def render(works: list[Work], sizes: dict, model: str) -> str:
    lines = ["datasets: " + "; ".join(f"{k} {tr:,} train / {va:,} val ({src})" for k, (tr, va, src) in sizes.items()),
             f"backbone: {model}", "",
             f"{'stage':<31} {'images':>15} {'devices':>7} {'device-hours':>12} {'wall hours':>10}  rate source"]
    notes: list[str] = []
    for w in works:
        refs = []
        for src in w.sources:
            if src not in notes:
                notes.append(src)
            refs.append(f"[{notes.index(src) + 1}]")
        hours = "-" if not w.devices else ("?" if w.hours is None else _h(w.hours))
        wall = "-" if not w.devices or w.hours is None else _h(w.hours / w.devices)
        lines.append(f"{w.stage:<31} {w.images:>15,} {w.devices or '-':>7} {hours:>12} {wall:>10}  {' '.join(refs)}")
    total = sum(w.hours or 0 for w in works)
    lines += [f"{'total (known rates)':<31} {'':>15} {'':>7} {_h(total):>12}", ""]
    lines += [f"[{i}] {src}" for i, src in enumerate(notes, 1)]
    if any(w.devices and w.hours is None for w in works):
        lines.append(f"?: no rate for this stage with {model}; give one with --ips STAGE=IMAGES_PER_S")
    return "\n".join(lines)


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
    except (ParamsError, ValueError) as e:
        print(f"localmim plan: error: {e}", file=sys.stderr)
        return 2
    works, sizes = plan(tree, Path(args.raw), ips)
    print(render(works, sizes, tree["pretrain"]["model"]))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", default=paths.RAW, help="folder of the dataset manifests (default: %(default)s)")
    p.add_argument("--ips", action="append", default=[], metavar="STAGE=N",
                   help="images/s per device for STAGE (pretrain, finetune, segment, detect, or infer for forward "
                        "passes), e.g. measured in MLflow; repeatable")

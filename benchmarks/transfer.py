"""Does pre-training help downstream, and does LocalMIM beat MAE there? ``segment`` and ``detect`` from three
encoders of one architecture, with seeds (issue 19 item 3; method §17 row 37).

``python benchmarks/transfer.py [--preset cpu|smoke] [--jobs 2]``:

1. data without a colour shortcut: the LocalMIM-vs-MAE miniature's pre-training pool (``localmim_vs_mae.make_data``:
   synth shapes, the class hue off, 10 classes x 1000 images, reused when present) and a larger mini ADE20K and mini
   COCO from ``localmim synth`` (their shapes are always randomly coloured; the same shape kinds as the pool);
2. per seed, ``localmim pretrain`` of ``localmim_vit_<size>`` and ``mae_vit_<size>`` (the params.yaml recipe, same
   epochs, batch, lr, seed; the kNN monitor at the end tells that each encoder learned something);
3. per seed, ``localmim segment`` and ``localmim detect`` from (a) the LocalMIM encoder, (b) the MAE encoder, (c) the
   same architecture randomly initialised (``pretrained: false``), downstream seed = pre-training seed, the
   params.yaml recipes with the budgets of the preset; the stages' own baselines (most frequent class, uniform
   random class, the training-box prior) come with every run;
4. per encoder, how spatial its tokens are on mini-COCO val images (``bench_dense_features.block_stats``);
5. writes ``<out>.md`` (mean +- sd over seeds; paired differences with a bootstrap interval over seeds) and
   ``<out>.png`` (every seed's value), and the raw numbers as ``<out>.json``.

Every step is the real CLI in a subprocess (one torch thread each, ``--jobs`` at a time); a finished step is kept
in ``--work`` and skipped on a rerun, so an interrupted measurement resumes. ``--replot`` re-renders from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

ENCODERS = ("LocalMIM", "MAE", "random init")
# The pre-trained encoder folder of each arm, per seed (random init: the LocalMIM folder, for its architecture only).
ENCODER_DIR = {"LocalMIM": "localmim", "MAE": "mae", "random init": "localmim"}
PRESETS = {  # pool as localmim_vs_mae's cpu preset; there, epoch 6 of 12 gave kNN 20.1 (LocalMIM) vs 11.4 (MAE)
    "cpu": dict(size="tiny_patch8", classes=10, pool_per_class=1000, val_per_class=50, min_side=32, max_side=48,
                pt_input=32, pt_epochs=6, seeds=3, seg_train=400, seg_val=100, coco_train=200, coco_val=100,
                seg_iters=300, det_epochs=3),
    "smoke": dict(size="micro_patch8", classes=4, pool_per_class=24, val_per_class=8, min_side=32, max_side=40,
                  pt_input=32, pt_epochs=1, seeds=3, seg_train=8, seg_val=4, coco_train=8, coco_val=4,
                  seg_iters=4, det_epochs=1),
}


def cli(work: Path, args: list[str], log: Path) -> None:
    """One ``localmim`` command with one torch thread and no MLflow; its output goes to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LOCALMIM_TRACKING="0")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        p = subprocess.run([str(BIN / "localmim"), *args, "--params", str(ROOT / "params.yaml")], cwd=work, env=env,
                           stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"localmim {' '.join(args)} failed ({p.returncode}); see {log}:\n"
                         f"{log.read_text()[-3000:]}")


def sets(section: str, **kv) -> list[str]:
    return [a for k, v in kv.items() for a in ("--set", f"{section}.{k}={v}")]


def make_data(a, work: Path) -> tuple[Path, Path]:
    """(pre-training shards with train/ and val/, synth root with ade20k/ and coco/)."""
    from localmim_vs_mae import make_data as pool

    shards = pool(argparse.Namespace(**{k: getattr(a, k) for k in ("classes", "pool_per_class", "val_per_class",
                                                                   "min_side", "max_side")}, num_workers=1), work)
    dense = work / f"dense_s{a.seg_train}-{a.seg_val}_c{a.coco_train}-{a.coco_val}"
    if not (dense / "coco" / "annotations" / "instances_val2017.json").is_file():
        cli(work, ["synth", str(dense), *sets("synth", train_per_class=1, val_per_class=1, seg_train=a.seg_train,
                   seg_val=a.seg_val, coco_train=a.coco_train, coco_val=a.coco_val)], work / "logs" / "synth.log")
    return shards, dense


def pretrain_job(a, work: Path, shards: Path, method: str, seed: int) -> None:
    out = work / "enc" / f"{method}_s{seed}"
    if (out / "encoder.json").is_file() and (work / "metrics" / f"pretrain_{method}_s{seed}.json").is_file():
        return
    cli(work, ["pretrain", "--shards", str(shards / "train"), "--out", str(out), "--ckpt-dir",
               str(work / "ck" / f"pretrain_{method}_s{seed}"), "--metrics",
               str(work / "metrics" / f"pretrain_{method}_s{seed}.json"), "--no-progress",
               *sets("pretrain", model=f"{method}_vit_{a.size}", input_size=a.pt_input, epochs=a.pt_epochs,
                     warmup_epochs=max(1, a.pt_epochs // 10), seed=seed, global_batch=64, batch_size=64, num_workers=1,
                     knn_every=a.pt_epochs, ckpt_minutes=0, device="cpu")],
        work / "logs" / f"pretrain_{method}_s{seed}.log")


def downstream_job(a, work: Path, dense: Path, stage: str, encoder: str, seed: int) -> None:
    name = f"{stage}_{encoder.replace(' ', '_')}_s{seed}"
    metrics = work / "metrics" / f"{name}.json"
    if metrics.is_file():
        return
    enc = work / "enc" / f"{ENCODER_DIR[encoder]}_s{seed}"
    common = dict(seed=seed, pretrained=str(encoder != "random init").lower(), device="cpu", num_workers=1)
    if stage == "segment":
        extra = sets("segment", iters=a.seg_iters, warmup_iters=max(1, a.seg_iters // 10), eval_every=a.seg_iters,
                     ckpt_every=a.seg_iters, **common)
    else:
        extra = sets("detect", epochs=a.det_epochs, eval_every=a.det_epochs, vis_images=0, **common)
    cli(work, [stage, "--encoder", str(enc), "--data", str(dense / ("ade20k" if stage == "segment" else "coco")),
               "--out", str(work / "out" / name), "--ckpt-dir", str(work / "ck" / name), "--metrics", str(metrics),
               *extra], work / "logs" / f"{name}.log")


def run_all(jobs: list, n: int) -> None:
    """Run the thunks ``n`` at a time; the first failure stops the measurement (finished steps are kept)."""
    with ThreadPoolExecutor(n) as ex:
        for f in [ex.submit(j) for j in jobs]:
            f.result()


def token_stats(work: Path, dense: Path, seeds: int) -> dict:
    """Top-block mean token cosine and spatial spread per encoder and seed (bench_dense_features' measure)."""
    import torch
    from bench_dense_features import block_stats, load_images

    import localmim.models  # noqa: F401  (registers the timm variants)
    from localmim.models.encoder_io import create_encoder, create_timm_model, read_encoder

    torch.set_num_threads(2)
    x = load_images(dense / "coco" / "val2017", 16, 64)  # [16, 3, 64, 64], the same images for every encoder
    out: dict[str, list] = {e: [] for e in ENCODERS}
    for s in range(seeds):
        for e in ENCODERS:
            spec = read_encoder(work / "enc" / f"{ENCODER_DIR[e]}_s{s}")
            torch.manual_seed(s)
            net = create_encoder(spec, input_size=64) if e != "random init" else create_timm_model(
                spec.timm_name, **{**spec.timm_kwargs, "img_size": 64})
            top = block_stats(net.eval(), x)[-1]
            out[e].append({"cos": top["cos"], "spread": top["spread"]})
    return out


def collect(a, work: Path, dense: Path, seconds: float) -> dict:
    def load(name: str) -> dict:
        return json.loads((work / "metrics" / f"{name}.json").read_text())

    runs = []
    for s in range(a.seeds):
        for e in ENCODERS:
            key = e.replace(" ", "_")
            seg, det = load(f"segment_{key}_s{s}"), load(f"detect_{key}_s{s}")
            row = {"encoder": e, "seed": s, "mIoU": seg["mIoU"], "mIoU_majority": seg["mIoU_majority"],
                   "mIoU_chance": seg["mIoU_chance"]}
            row |= {k: 100 * det[k] for k in ("bbox_AP50", "bbox_AP", "segm_AP50", "bbox_AP50_prior")}
            if e != "random init":
                pt = load(f"pretrain_{ENCODER_DIR[e]}_s{s}")
                row["pretrain_knn"] = pt.get("knn_top1", float("nan"))
            runs.append(row)
    args = {k: v for k, v in vars(a).items() if k not in ("work", "out", "replot")}  # no machine paths
    return {"args": args, "runs": runs, "tokens": token_stats(work, dense, a.seeds), "seconds": seconds}


METRICS = (("mIoU", "segment mIoU"), ("bbox_AP50", "detect box AP50"), ("bbox_AP", "detect box AP"),
           ("segm_AP50", "detect mask AP50"))


def values(raw: dict, encoder: str, key: str) -> np.ndarray:
    """``[seeds]`` of one encoder, ordered by seed (the pairing of the differences)."""
    rows = sorted((r for r in raw["runs"] if r["encoder"] == encoder), key=lambda r: r["seed"])
    return np.array([r[key] for r in rows], dtype=float)


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over seeds and its 90% bootstrap interval (seeds resampled with replacement, pairs kept)."""
    d = a - b
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(boot, 5)), float(np.percentile(boot, 95))


def table(raw: dict) -> str:
    a = raw["args"]
    n = len(values(raw, "LocalMIM", "mIoU"))
    head = [f"Transfer, preset `{a['preset']}`: `{a['size']}` ViT pre-trained at {a['pt_input']} px for "
            f"{a['pt_epochs']} epochs on {a['classes'] * a['pool_per_class']} synth shape images without the "
            "colour prior (LocalMIM and MAE, params.yaml `pretrain` recipe, one encoder per method and seed); "
            f"`segment` {a['seg_iters']} iterations on {a['seg_train']} / {a['seg_val']} mini-ADE20K images, "
            f"`detect` {a['det_epochs']} epochs on {a['coco_train']} / {a['coco_val']} mini-COCO images "
            "(params.yaml recipes otherwise, 64 px, downstream seed = pre-training seed); "
            f"{n} seeds; {raw['seconds'] / 60:.1f} min on 2 cores ({a['jobs']} one-thread jobs at a time). "
            "Percent; mean ± sd over seeds.", "",
            "| encoder | pre-training kNN top-1 | " + " | ".join(t for _, t in METRICS) + " |",
            "|---" * (len(METRICS) + 2) + "|"]
    for e in ENCODERS:
        knn = values(raw, e, "pretrain_knn") if e != "random init" else None
        cells = [f"{knn.mean():.1f} ± {knn.std(ddof=1):.1f}" if knn is not None else "-"]
        cells += [f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" for v in (values(raw, e, k) for k, _ in METRICS)]
        head.append(f"| {e} | " + " | ".join(cells) + " |")
    base = [("most frequent class", "mIoU_majority", 0), ("uniform random class", "mIoU_chance", 0),
            ("training boxes, image unseen", "bbox_AP50_prior", 1)]
    for label, key, col in base:
        v = values(raw, "LocalMIM", key)
        cells = ["-"] * len(METRICS)
        cells[col] = f"{v.mean():.2f}"
        head.append(f"| baseline: {label} | - | " + " | ".join(cells) + " |")
    head += ["", f"Paired differences over seeds (mean, 90% bootstrap interval; with {n} seeds the bootstrap has "
             f"{math.comb(2 * n - 1, n)} distinct resamples, so read it as a spread, not a test):", "",
             "| difference | " + " | ".join(t for _, t in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for x, y in (("LocalMIM", "random init"), ("MAE", "random init"), ("LocalMIM", "MAE")):
        cells = ["{:+.2f} [{:+.2f}, {:+.2f}]".format(*paired(values(raw, x, k), values(raw, y, k))) for k, _ in METRICS]
        head.append(f"| {x} - {y} | " + " | ".join(cells) + " |")
    tok = raw["tokens"]
    head += ["", "Top block on 16 mini-COCO val images at 64 px (`bench_dense_features.py`'s measure; mean over "
             "seeds): mean token cosine within an image / spatial std as a fraction of the token norm: "
             + "; ".join(f"{e} {np.mean([t['cos'] for t in tok[e]]):.3f} / {np.mean([t['spread'] for t in tok[e]]):.3f}"
                         for e in ENCODERS) + "."]
    return "\n".join(head)


def write_plot(raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2))
    for ax, (k, title) in zip(axes, METRICS, strict=True):
        for i, e in enumerate(ENCODERS):
            v = values(raw, e, k)
            ax.scatter(np.full(len(v), i) + np.linspace(-0.1, 0.1, len(v)), v, s=18)
            ax.hlines(v.mean(), i - 0.25, i + 0.25, color="k")
        if k in ("mIoU", "bbox_AP50"):
            b = values(raw, "LocalMIM", "mIoU_chance" if k == "mIoU" else "bbox_AP50_prior").mean()
            ax.axhline(b, ls="--", c="grey", lw=1, label="uniform class" if k == "mIoU" else "box prior")
            ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), frameon=False, fontsize=8)
        ax.set_xticks(range(len(ENCODERS)), ENCODERS, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(raw: dict, out: Path) -> None:
    md = table(raw)
    out.with_suffix(".md").write_text(md + f"\n\n![transfer]({out.with_suffix('.png').name})\n")
    write_plot(raw, out.with_suffix(".png"))
    print(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for k, v in PRESETS["cpu"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"(cpu preset: {v})")
    ap.add_argument("--jobs", type=int, default=2, help="CLI steps at a time, one torch thread each")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench_transfer"), help="scratch directory (resumable)")
    ap.add_argument("--out", default=str(HERE / "transfer"), help="output stem for .md, .png and .json")
    ap.add_argument("--replot", action="store_true", help="only re-render .md and .png from <out>.json")
    a = ap.parse_args()
    out = Path(a.out)
    if a.replot:
        write_outputs(json.loads(out.with_suffix(".json").read_text()), out)
        return 0
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    t0, work = time.time(), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    shards, dense = make_data(a, work)
    seeds = range(a.seeds)
    run_all([lambda m=m, s=s: pretrain_job(a, work, shards, m, s) for s in seeds for m in ("localmim", "mae")], a.jobs)
    print(f"pre-training done ({(time.time() - t0) / 60:.1f} min)", file=sys.stderr, flush=True)
    run_all([lambda st=st, e=e, s=s: downstream_job(a, work, dense, st, e, s)
             for st in ("detect", "segment") for s in seeds for e in ENCODERS], a.jobs)
    raw = collect(a, work, dense, time.time() - t0)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    write_outputs(raw, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's claim in miniature: LocalMIM vs the MAE baseline, same encoder, same pre-training budget.

One command (``python benchmarks/localmim_vs_mae.py``) on the embedded data:

1. uses ``data/shards/{train,val}`` when ``make demo`` built them, else runs ``localmim synth`` + ``localmim shard``
   into the work directory;
2. pre-trains ``localmim_vit_<size>`` and ``mae_vit_<size>`` (identical ViT encoder; the params.yaml ``pretrain``
   recipe with the same epochs, batch, lr, seed) and exports the encoder after 25%, 50% and 100% of the epochs;
3. runs the linear probe and a short fine-tune (the params.yaml ``linprobe`` / ``finetune`` recipes, shortened
   by the flags below) on every snapshot, plus a fine-tune of the randomly initialised encoder for reference;
4. writes ``benchmarks/localmim_vs_mae.md`` (table) and ``benchmarks/localmim_vs_mae.png`` (plot), prints the
   markdown on stdout and, with ``--json``, the raw numbers.

The default budget (micro ViT at 32 px, 8 pre-training epochs, 20 fine-tuning epochs) took 10 minutes on a
shared 2-core CPU machine. At that budget the embedded shapes task stays near chance for every encoder (a linear
probe on raw pixels also gets ~13%); the table states its own noise level. Raise ``--epochs``/``--ft-epochs``/
``--input-size`` (and ``--size tiny_patch8``) for a measurement with power; the harness is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


def ensure_shards(shards: Path, work: Path) -> Path:
    """``shards`` when both manifests exist, else a fresh synth + shard of the embedded data under ``work``."""
    if (shards / "train" / "train.json").is_file() and (shards / "val" / "val.json").is_file():
        return shards
    out = work / "shards"
    if (out / "train" / "train.json").is_file() and (out / "val" / "val.json").is_file():
        return out
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    cmds = [["synth", str(work / "raw")]] + [
        ["shard", str(work / "raw" / "imagenet" / s), str(out / s), "--split", s] for s in ("train", "val")
    ]
    for c in cmds:
        print(f"$ localmim {' '.join(c)}", file=sys.stderr, flush=True)
        subprocess.run([str(BIN / "localmim"), *c, "--params", str(ROOT / "params.yaml")], check=True, env=env,
                       cwd=work, stdout=subprocess.DEVNULL)
    return out


def pretrain_snapshots(mode: str, args, train_dir: Path, work: Path) -> dict[int, tuple[Path, float]]:
    """Pre-train ``<mode>_vit_<size>`` from scratch; export the encoder at each milestone epoch.

    Returns ``{epoch: (encoder dir, pre-training seconds so far)}``."""
    from localmim.config import load_section
    from localmim.config.pretrain import PretrainConfig
    from localmim.models.export import export_encoder
    from localmim.train.pretrain import run_pretrain
    from localmim.utils.io import atomic_torch_save, atomic_write_json

    cfg = load_section("pretrain", PretrainConfig, ROOT / "params.yaml", [
        f"pretrain.model={mode}_vit_{args.size}", "pretrain.mode=auto", "pretrain.target=auto",
        f"pretrain.input_size={args.input_size}", f"pretrain.epochs={args.epochs}",
        f"pretrain.warmup_epochs={max(1, args.epochs // 8)}", f"pretrain.num_workers={args.num_workers}",
        f"pretrain.ckpt_every={args.epochs}", "pretrain.data=online", "pretrain.device=auto",
    ])
    marks = milestones(args.epochs)
    snaps: dict[int, tuple[Path, float]] = {}
    ckpt = work / "ckpt" / mode
    shutil.rmtree(ckpt, ignore_errors=True)  # a measurement: always from scratch, never resumed

    def on_epoch_end(epoch: int, model) -> None:
        if epoch + 1 in marks:
            name, kwargs, sd = export_encoder(model)
            d = work / mode / f"ep{epoch + 1:03d}"
            atomic_torch_save({k: v.contiguous().cpu() for k, v in sd.items()}, d / "encoder.pt")
            atomic_write_json(d / "encoder.json", {"timm_name": name, "timm_kwargs": kwargs})
            snaps[epoch + 1] = (d, time.time() - t0)
            print(f"  {mode}: exported encoder after epoch {epoch + 1}", file=sys.stderr, flush=True)

    t0 = time.time()
    run_pretrain(cfg, train_dir, ckpt, on_epoch_end=on_epoch_end, progress=False)
    return snaps


def milestones(epochs: int) -> list[int]:
    return sorted({max(1, round(epochs * f)) for f in (0.25, 0.5, 1.0)})


def evaluate_encoder(enc_dir: Path | None, args, shards: Path, work: Path, tag: str,
                     random_like: Path | None = None) -> dict[str, float]:
    """Linear-probe and fine-tune top-1 of one encoder (``enc_dir=None``: random init shaped like ``random_like``)."""
    import torch

    from localmim.config import load_section
    from localmim.config.finetune import FinetuneConfig
    from localmim.config.linprobe import LinprobeConfig
    from localmim.models.encoder_io import EncoderSpec, create_timm_model, read_encoder
    from localmim.train.finetune import FinetuneData, finetune
    from localmim.train.linprobe import linprobe

    if enc_dir is None:
        ref = read_encoder(random_like)
        torch.manual_seed(0)
        net = create_timm_model(ref.timm_name, num_classes=0, **ref.timm_kwargs)
        enc = EncoderSpec(ref.timm_name, ref.timm_kwargs, {k: v for k, v in net.state_dict().items()})
    else:
        enc = read_encoder(enc_dir)
    lp = load_section("linprobe", LinprobeConfig, ROOT / "params.yaml", [
        f"linprobe.epochs={args.lp_epochs}", f"linprobe.warmup_epochs={max(1, args.lp_epochs // 10)}",
        f"linprobe.num_workers={args.num_workers}", "linprobe.input_size=0"])
    ft = load_section("finetune", FinetuneConfig, ROOT / "params.yaml", [
        f"finetune.epochs={args.ft_epochs}", f"finetune.warmup_epochs={max(1, args.ft_epochs // 5)}",
        f"finetune.num_workers={args.num_workers}", "finetune.input_size=0"])
    t0 = time.time()
    lr = linprobe(lp, enc, train_dir=shards / "train", val_dir=shards / "val")
    t1 = time.time()
    ckpt = work / "ft_ckpt" / tag
    shutil.rmtree(ckpt, ignore_errors=True)
    fr = finetune(ft, enc, FinetuneData(shards / "train", shards / "val", ckpt))
    print(f"  {tag}: linprobe {lr.best_top1:.1f} ({t1 - t0:.0f}s), finetune {fr.best_top1:.1f} "
          f"({time.time() - t1:.0f}s)", file=sys.stderr, flush=True)
    return {"linprobe_top1": lr.top1, "linprobe_best": lr.best_top1, "finetune_top1": fr.top1,
            "finetune_best": fr.best_top1}


def table(rows: list[dict], args, total_s: float, n_classes: int, n_val: int) -> str:
    chance = 100.0 / n_classes
    ref = max(chance, sum(r["finetune_top1"] for r in rows) / len(rows))
    se = 100.0 * (ref / 100.0 * (1 - ref / 100.0) / n_val) ** 0.5
    lines = [
        f"LocalMIM vs MAE on the embedded data (`{args.size}` ViT at {args.input_size} px, {args.epochs} pre-training "
        f"epochs each, same recipe and seed; linear probe {args.lp_epochs} epochs on cached features, fine-tune "
        f"{args.ft_epochs} epochs; top-1 % on val, chance {chance:.0f}%; total {total_s / 60:.1f} min). "
        "`last` = final epoch, `best` = best epoch.",
        "",
        f"Resolution of this measurement: {n_val} val images, so the binomial standard error of a top-1 near "
        f"{ref:.0f}% is {se:.1f} points, and a gap under about {2 * se:.0f} points is noise. `best` is the maximum "
        "over epochs and is biased upward at chance level.",
        "",
        "| method | PT epochs (% of budget) | PT time (s) | linprobe top-1 last / best | fine-tune top-1 last / best |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        pct = f"{r['epoch']} ({100 * r['epoch'] / args.epochs:.0f}%)" if r["method"] != "random init" else "0"
        lines.append(f"| {r['method']} | {pct} | {r['pt_seconds']:.0f} | {r['linprobe_top1']:.1f} / "
                     f"{r['linprobe_best']:.1f} | {r['finetune_top1']:.1f} / {r['finetune_best']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], args, path: Path, n_classes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    rand = next((r for r in rows if r["method"] == "random init"), None)
    for ax, key, title in zip(axes, ("linprobe_best", "finetune_best"), ("linear probe", "fine-tune"), strict=True):
        for method, style in (("LocalMIM", "o-"), ("MAE", "s--")):
            pts = [(100 * r["epoch"] / args.epochs, r[key]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts, strict=True), style, label=method)
        if rand is not None:
            ax.axhline(rand[key], color="gray", lw=1, ls=":", label="random init")
        ax.axhline(100.0 / n_classes, color="black", lw=0.8, ls="-.", label="chance")
        ax.set_xlabel(f"% of pre-training budget ({args.epochs} epochs)")
        ax.set_title(f"{title} top-1 (best epoch)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1 (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="micro_patch8", help="encoder size in the models registry (default: %(default)s)")
    ap.add_argument("--input-size", type=int, default=32, help="pre-training / fine-tuning resolution")
    ap.add_argument("--epochs", type=int, default=8, help="pre-training epochs per method (the budget)")
    ap.add_argument("--ft-epochs", type=int, default=20, help="fine-tuning epochs per snapshot")
    ap.add_argument("--lp-epochs", type=int, default=30, help="linear-probe epochs per snapshot")
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--shards", default=str(ROOT / "data" / "shards"), help="shard root with train/ and val/")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench_localmim_vs_mae"), help="scratch directory")
    ap.add_argument("--out", default=str(HERE / "localmim_vs_mae"), help="output stem for .md and .png")
    ap.add_argument("--json", default=None, help="also write the raw rows as JSON here")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only re-render the table/plot from a --json file")
    args = ap.parse_args()
    if args.replot:
        raw = json.loads(Path(args.replot).read_text())
        for k, v in raw["args"].items():
            if k not in ("replot", "out", "json"):
                setattr(args, k, v)
        return write_outputs(raw["rows"], args, raw["seconds"], raw["n_classes"], raw["n_val"])

    from localmim.data.classify import count_samples, num_classes_of

    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(Path(args.shards), work)
    n_classes = num_classes_of(shards / "train")
    rows: list[dict] = []
    snaps_all = {}
    for mode in ("localmim", "mae"):
        print(f"pre-training {mode}_vit_{args.size} for {args.epochs} epochs", file=sys.stderr, flush=True)
        snaps_all[mode] = pretrain_snapshots(mode, args, shards / "train", work)
    for mode, snaps in snaps_all.items():
        for ep, (d, secs) in sorted(snaps.items()):
            r = evaluate_encoder(d, args, shards, work, f"{mode}_ep{ep}")
            rows.append({"method": "LocalMIM" if mode == "localmim" else "MAE", "epoch": ep, "pt_seconds": secs, **r})
    ref = next(iter(snaps_all["localmim"].values()))[0]
    rows.append({"method": "random init", "epoch": 0, "pt_seconds": 0.0,
                 **evaluate_encoder(None, args, shards, work, "random", random_like=ref)})
    total = time.time() - t0
    n_val = count_samples(shards / "val")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": total, "n_classes": n_classes, "n_val": n_val,
                                               "args": vars(args)}, indent=2))
    return write_outputs(rows, args, total, n_classes, n_val)


def write_outputs(rows: list[dict], args, total: float, n_classes: int, n_val: int) -> int:
    md = table(rows, args, total, n_classes, n_val)
    out = Path(args.out)
    out.with_suffix(".md").write_text(md + "\n\n![LocalMIM vs MAE](localmim_vs_mae.png)\n")
    plot(rows, args, out.with_suffix(".png"), n_classes)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

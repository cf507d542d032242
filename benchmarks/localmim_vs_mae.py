"""Does LocalMIM learn faster than MAE? The paper's claim in miniature, with seeds, spread and wall time.

``python benchmarks/localmim_vs_mae.py [--preset cpu|smoke|gpu]``:

1. data: the embedded shapes task (``localmim.synth``) with the class-hue prior OFF (colour carries no class
   information: only shape does), a large unlabelled pre-training pool, and few labels: the first
   ``--label-train`` train samples (kNN bank / probe training set) and every val sample;
2. pre-trains ``localmim_vit_<size>`` and ``mae_vit_<size>`` (the same encoder architecture and seed, the params.yaml
   ``pretrain`` recipe, same epochs, batch, lr) for every seed; epoch 0 of every curve is that run's random init
   (not bit-identical between the methods: their decoders are built between encoder parts in the init order);
3. every ``--eval-every`` epochs: weighted kNN top-1 (cosine, k 20, T 0.07) and linear-probe top-1 (logistic
   regression on standardised features) of the top block's pooled features; pre-training seconds per epoch are
   measured without the evaluation time;
4. after the last epoch, per-block probe/kNN and attention NMI of every encoder (``localmim analyze``'s measures),
   to see *why* one wins: are LocalMIM's lower layers better?
5. writes ``<out>.md`` (tables: mean +- sd over seeds per epoch; epochs and wall time for LocalMIM to reach MAE's
   final accuracy, with a bootstrap over seeds; the final gap with its 90% interval) and ``<out>.png``, and the raw
   numbers with ``--json``. ``--replot JSON`` re-renders from saved numbers.

Presets: ``cpu`` (default; ViT-Tiny depth 12 at 32 px; estimated 40-60 min on 2 free cores from measured
single-thread rates: LocalMIM 205, MAE 269 pre-training images/s, so ~49 / 37 s per 10,000-image epoch), ``smoke`` (a
minute: micro ViT, tiny pool; checks the harness, measures nothing), ``gpu`` (larger pool, 64 px, more epochs
and seeds; minutes on one H200). Any preset value can be overridden by its flag.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from localmim_vs_mae_stats import crossing_bootstrap, summarize, table, write_plot  # noqa: E402

PRESETS = {
    "cpu": dict(size="tiny_patch8", input_size=32, classes=10, pool_per_class=1000, label_train=1000, val_per_class=50,
                epochs=12, eval_every=2, seeds=3, batch_size=64, num_workers=1, device="cpu", min_side=32, max_side=48),
    "smoke": dict(size="micro_patch8", input_size=32, classes=4, pool_per_class=24, label_train=48, val_per_class=8,
                  epochs=2, eval_every=1, seeds=3, batch_size=16, num_workers=0, device="cpu", min_side=32,
                  max_side=40),
    "gpu": dict(size="tiny_patch8", input_size=64, classes=10, pool_per_class=2000, label_train=2000, val_per_class=100,
                epochs=20, eval_every=2, seeds=3, batch_size=256, num_workers=14, device="cuda", min_side=64,
                max_side=96),
}


def make_data(args, work: Path) -> Path:
    """Synth ImageNet layout without the colour prior -> shards ``work/shards/{train,val}`` (reused when present)."""
    from localmim.data.shards.write import ShardOptions, write_shards
    from localmim.synth import write_imagenet

    key = f"c{args.classes}_p{args.pool_per_class}_v{args.val_per_class}_s{args.min_side}-{args.max_side}"
    out = work / "shards" / key
    if (out / "train" / "train.json").is_file() and (out / "val" / "val.json").is_file():
        return out
    raw = work / "raw" / key
    shutil.rmtree(raw, ignore_errors=True)
    t0 = time.time()
    write_imagenet(raw, seed=0, num_classes=args.classes, per_class={"train": args.pool_per_class,
                   "val": args.val_per_class}, min_side=args.min_side, max_side=args.max_side, quality=90,
                   colour_prior=0.0)  # fmt: skip
    for split, n in (("train", args.pool_per_class), ("val", args.val_per_class)):
        per_shard = max(8, -(-n * args.classes // max(2, 2 * args.num_workers)))
        write_shards(raw / split, out / split, split, ShardOptions(max_samples_per_shard=per_shard, workers=2),
                     progress=False)
    shutil.rmtree(raw, ignore_errors=True)
    print(f"data: {args.classes} classes x {args.pool_per_class} train + {args.val_per_class} val, no colour prior "
          f"({time.time() - t0:.0f}s) -> {out}", file=sys.stderr, flush=True)
    return out


def load_labelled(shards: Path, args):
    """uint8 images and labels of the labelled subsets: first ``label_train`` train samples, every val sample."""
    import torch

    from localmim.eval.knn import iter_labelled_uint8

    def load(d, limit):
        xs, ys = zip(*iter_labelled_uint8(d, limit, args.input_size, 256), strict=True)
        return torch.cat(xs), torch.cat(ys)

    return load(shards / "train", args.label_train), load(shards / "val", 0)


def evaluate(model, labelled, num_classes: int, device) -> dict[str, float]:
    """kNN and linear-probe top-1 of the pre-training model's pooled top-tap features."""
    import torch

    from localmim.eval.analysis import probe_top1
    from localmim.eval.knn import knn_top1, pooled_features
    from localmim.runtime.precision import autocast

    was = model.training
    model.eval()
    amp = torch.bfloat16 if device.type == "cuda" else None
    feats = []
    for x, _ in labelled:
        with autocast(device, amp):
            feats.append(torch.cat([pooled_features(model, b.to(device)) for b in x.split(256)]).float())
    model.train(was)
    (_, ty), (_, vy) = labelled
    return {"knn": knn_top1(feats[0], ty, feats[1], vy, num_classes),
            "probe": probe_top1(feats[0], ty, feats[1], vy, num_classes, steps=100)}


def per_block(model, labelled, num_classes: int, device) -> dict[str, list[float]]:
    """Per-block probe / kNN top-1 and attention NMI of the exported encoder (the analyze stage's measures)."""
    import torch

    from localmim.eval.analysis import layer_outputs, per_layer_scores
    from localmim.models.encoder_io import create_timm_encoder
    from localmim.targets import normalize

    net = create_timm_encoder(model).to(device).eval()
    outs = []
    for i, (x, _) in enumerate(labelled):
        parts = [layer_outputs(net, normalize(b.to(device)), attention=i == 1 and j == 0)
                 for j, b in enumerate(x.split(256))]
        outs.append(([torch.cat(fs) for fs in zip(*[p.feats for p in parts], strict=True)], parts[0].nmi))
    (_, ty), (_, vy) = labelled
    res = per_layer_scores(outs[0][0], ty, outs[1][0], vy, num_classes, probe_steps=100)
    return {**res, "attn_nmi": [float(v.mean()) for v in outs[1][1]]}


def run_one(mode: str, seed: int, args, shards: Path, labelled, num_classes: int, work: Path) -> dict:
    """Pre-train one method with one seed, evaluating every ``eval_every`` epochs; seconds exclude evaluation."""
    import torch

    from localmim.config import load_section
    from localmim.config.pretrain import PretrainConfig
    from localmim.models.encoder_io import build_pretrain_model as build_model
    from localmim.runtime.distributed import resolve_device
    from localmim.train.pretrain import run_pretrain

    cfg = load_section("pretrain", PretrainConfig, ROOT / "params.yaml", [
        f"pretrain.model={mode}_vit_{args.size}", "pretrain.mode=auto", "pretrain.target=auto",
        f"pretrain.input_size={args.input_size}", f"pretrain.epochs={args.epochs}", f"pretrain.seed={seed}",
        f"pretrain.warmup_epochs={max(1, args.epochs // 10)}", f"pretrain.batch_size={args.batch_size}",
        f"pretrain.global_batch={args.batch_size}",
        f"pretrain.num_workers={args.num_workers}", f"pretrain.ckpt_every={args.epochs}", "pretrain.ckpt_minutes=0",
        "pretrain.knn_every=0", "pretrain.data=online", f"pretrain.device={args.device}", "pretrain.log_every=50"])
    dev = resolve_device(args.device)
    torch.manual_seed(seed)  # the same init as run_pretrain's (it seeds, then builds the model the same way)
    curve = [{"epoch": 0, "seconds": 0.0, **evaluate(build_model(cfg).to(dev), labelled, num_classes, dev)}]
    state = {"eval": 0.0, "t0": time.perf_counter(), "blocks": None}

    def on_epoch_end(epoch: int, model) -> None:
        ep = epoch + 1
        if ep % args.eval_every and ep != args.epochs:
            return
        t = time.perf_counter()
        curve.append({"epoch": ep, "seconds": t - state["t0"] - state["eval"],
                      **evaluate(model, labelled, num_classes, dev)})
        if ep == args.epochs:
            state["blocks"] = per_block(model, labelled, num_classes, dev)
        state["eval"] += time.perf_counter() - t
        print(f"  {mode} seed {seed} epoch {ep}: kNN {curve[-1]['knn']:.1f} probe {curve[-1]['probe']:.1f} "
              f"({curve[-1]['seconds']:.0f}s pre-training)", file=sys.stderr, flush=True)

    ckpt = work / "ckpt" / f"{mode}_s{seed}"
    shutil.rmtree(ckpt, ignore_errors=True)  # a measurement: always from scratch, never resumed
    run_pretrain(cfg, shards / "train", ckpt, on_epoch_end=on_epoch_end, progress=False)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"method": "LocalMIM" if mode == "localmim" else "MAE", "seed": seed, "curve": curve,
            "blocks": state["blocks"], "sec_per_epoch": curve[-1]["seconds"] / args.epochs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for k, v in PRESETS["cpu"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"(cpu preset: {v})")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default). On a busy shared "
                    "machine use 1: ViT-Tiny pre-training ran at 205 images/s with 1 thread, 33 with 2 oversubscribed")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench_localmim_vs_mae"), help="scratch directory")
    ap.add_argument("--out", default=str(HERE / "localmim_vs_mae"), help="output stem for .md and .png")
    ap.add_argument("--json", default=None, help="also write the raw numbers as JSON here")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only re-render the table/plot from a --json file")
    args = ap.parse_args()
    if args.replot:
        raw = json.loads(Path(args.replot).read_text())
        return write_outputs(raw, Path(args.out))
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    import torch

    from localmim.data.classify import num_classes_of

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    work = Path(args.work)
    shards = make_data(args, work)
    num_classes = num_classes_of(shards / "train")
    labelled = load_labelled(shards, args)
    raw = {"args": {k: v for k, v in vars(args).items() if k not in ("replot", "json")}, "runs": [],
           "num_classes": num_classes, "n_label_train": len(labelled[0][1]), "n_val": len(labelled[1][1]),
           "n_pool": args.classes * args.pool_per_class}
    for seed in range(args.seeds):
        for mode in ("localmim", "mae"):
            print(f"pre-training {mode}_vit_{args.size}, seed {seed}, {args.epochs} epochs", file=sys.stderr,
                  flush=True)
            raw["runs"].append(run_one(mode, seed, args, shards, labelled, num_classes, work))
            raw["seconds"] = time.time() - t0
            if args.json:  # after every run: a cut-off measurement keeps its finished seeds (--replot renders them)
                Path(args.json).write_text(json.dumps(raw, indent=1))
    return write_outputs(raw, Path(args.out))


def write_outputs(raw: dict, out: Path) -> int:
    stats = summarize(raw["runs"])
    cross = {m: crossing_bootstrap(raw["runs"], m) for m in ("knn", "probe")}
    md = table(raw, stats, cross)
    out.with_suffix(".md").write_text(md + f"\n\n![LocalMIM vs MAE]({out.with_suffix('.png').name})\n")
    write_plot(raw, stats, out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

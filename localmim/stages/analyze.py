"""``localmim analyze --encoder data/pretrain --out data/analyze``: what every layer of the encoder learned.

For the exported encoder (ViT; Swin: per-block probe and kNN only, see :mod:`localmim.eval.analysis`):

* per-block linear-probe and weighted-kNN top-1 (probe trained on ``probe_train`` train images, scored on
  ``probe_val`` val images; features = mean of the block's patch tokens);
* attention NMI (method §10.2) and mean attention distance per block, on ``attn_images`` un-masked val images;
* every tap's reconstruction next to its target on the masked cells of ``recon_images`` val images (needs the
  pre-training checkpoint, which holds the decoders: ``--checkpoint`` or the one recorded in ``encoder.json``).

Outputs: ``OUT/layers.png`` (curves per block, taps marked), ``OUT/reconstructions.png``, ``OUT/analyze.json``
(everything per block), ``OUT/params.yaml``; ``metrics/analyze.json`` (summary) and ``metrics/analyze_layers.csv``
(one row per block: the DVC plot). MLflow: the
per-block values as metrics with step = block (1-based), the summary, and the PNGs and JSON as artifacts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from localmim.config.analyze import AnalyzeConfig
from localmim.pipeline.stage import StageContext, StageError, flag, stage


@stage(
    "analyze",
    section="analyze",
    config=AnalyzeConfig,
    help="per-layer probe/kNN, attention NMI and distance, tap reconstructions of a pre-trained encoder",
    flags=[
        flag("--encoder", default="data/pretrain", help="exported encoder: directory or .pt (default: %(default)s)"),
        flag("--checkpoint", default=None, help="pre-training checkpoint with the decoders (default: the one "
             "recorded in encoder.json; reconstructions are skipped when there is none)"),
        flag("--train", default="data/shards/train", help="train shard directory (default: %(default)s)"),
        flag("--val", default="data/shards/val", help="val shard directory (default: %(default)s)"),
        flag("--out", default="data/analyze", help="output directory (default: %(default)s)"),
        flag("--metrics", default="metrics/analyze.json", help="metrics file (default: %(default)s)"),
        flag("--plots", default="metrics/analyze_layers.csv", help="per-block CSV (DVC plot; default: %(default)s)"),
        flag("--device", key="device", choices=["auto", "cpu", "cuda"], help="device"),
    ],
)
def run(cfg: AnalyzeConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.data.classify import num_classes_of
    from localmim.eval.analysis import is_swin, per_layer_scores
    from localmim.models.encoder_io import create_encoder, read_encoder
    from localmim.stages._analyze_plots import plot_layers
    from localmim.utils.distributed import resolve_device
    from localmim.utils.io import atomic_write_json, atomic_write_text

    args, t0 = ctx.args, time.time()
    try:
        dev = resolve_device(cfg.device)
        enc = read_encoder(args.encoder)
        num_classes = num_classes_of(args.train)
        if not num_classes:
            raise ValueError(f"{args.train}: class count unknown (no manifest 'classes')")
        net = create_encoder(enc, input_size=cfg.input_size).to(dev).eval()
        size = cfg.input_size or enc.img_size
        train = _layer_outputs(net, args.train, cfg.probe_train, 0, size, cfg, dev)
        val = _layer_outputs(net, args.val, cfg.probe_val, cfg.attn_images, size, cfg, dev)
        pretrain = _pretrain_model(args.checkpoint, Path(args.encoder), dev)
    except (ValueError, FileNotFoundError) as e:
        raise StageError(f"analyze: {e}") from None
    swin = is_swin(net)
    scores = per_layer_scores(train.feats, train.labels, val.feats, val.labels, num_classes,
                              probe_steps=cfg.probe_steps, weight_decay=cfg.probe_weight_decay, k=cfg.knn_k,
                              temperature=cfg.knn_temperature)
    per_layer = {**scores, "attn_nmi": [float(x.mean()) for x in val.nmi],
                 "attn_distance_px": [float(x.mean()) for x in val.dist]}
    taps = [int(t) for t in getattr(pretrain, "taps", [])] if pretrain is not None and not swin else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_layers(per_layer, taps, out / "layers.png", title=f"{enc.timm_name} ({len(train.labels)} train / "
                f"{len(val.labels)} val images, {num_classes} classes)")
    recon = _reconstructions(pretrain, args.val, cfg, dev, out / "reconstructions.png")
    summary = _summary(per_layer, taps, num_classes)
    doc = {**summary, "per_layer": per_layer, "taps": taps, "architecture": "swin" if swin else "vit",
           "attention_measures": "skipped: Swin window attention" if swin else "per block, mean over images/heads",
           "reconstructions": recon, "num_train": len(train.labels), "num_val": len(val.labels),
           "num_attn_images": int(val.nmi[0].shape[0]) if val.nmi else 0}
    seconds = time.time() - t0  # a time: MLflow and the metrics file, not the DVC-tracked analyze.json
    ctx.dump_params(cfg, out)
    atomic_write_json(out / "analyze.json", doc)
    ctx.write_metrics(args.metrics, {**summary, "seconds": seconds})
    atomic_write_text(args.plots, _layers_csv(per_layer))
    for i in range(len(per_layer["probe_top1"])):
        ctx.tracker.log_metrics({f"layer_{k}": v[i] for k, v in per_layer.items() if v}, step=i + 1)
    for name in ("layers.png", "reconstructions.png", "analyze.json"):
        ctx.tracker.log_artifact(out / name, artifact_path="analyze")
    print(f"localmim analyze: {len(per_layer['probe_top1'])} blocks; probe top-1 by block "
          f"{', '.join(f'{v:.0f}' for v in per_layer['probe_top1'])}; {seconds:.1f}s -> {out}", file=sys.stderr)
    return {**summary, "seconds": seconds}


class _Split:
    """Per-block features of one split (+ attention measures of its first images) and the labels."""

    def __init__(self, feats, nmi, dist, labels):
        self.feats, self.nmi, self.dist, self.labels = feats, nmi, dist, labels


def _layer_outputs(net, shard_dir, limit: int, attn_images: int, size: int, cfg: AnalyzeConfig, dev) -> _Split:
    """Per-block features of the first ``limit`` samples; attention measures of the first ``attn_images``."""
    from localmim.eval.analysis import layer_outputs
    from localmim.eval.knn import iter_labelled_uint8
    from localmim.targets import normalize

    feats, nmi, dist, labels, seen = [], [], [], [], 0
    for x, y in iter_labelled_uint8(shard_dir, limit, size, cfg.batch_size, cfg.num_workers):
        n_attn = max(0, min(len(y), attn_images - seen))
        o = layer_outputs(net, normalize(x.to(dev)), attention=n_attn > 0)
        feats.append([f.cpu() for f in o.feats])
        if n_attn:
            nmi.append([v[:n_attn] for v in o.nmi])
            dist.append([v[:n_attn] for v in o.dist])
        labels.append(y)
        seen += len(y)
    if not feats:
        raise ValueError(f"{shard_dir}: no samples")
    per_block = lambda parts: [torch.cat(xs) for xs in zip(*parts, strict=True)]  # per block, images joined
    return _Split(per_block(feats), per_block(nmi), per_block(dist), torch.cat(labels))


def _pretrain_model(checkpoint: str | None, encoder: Path, dev):
    """The full pre-training model (encoder + decoders) from its checkpoint, or None when none is recorded."""
    import json

    from localmim.config.pretrain import PretrainConfig
    from localmim.train import checkpoint as ckpt
    from localmim.train.pretrain import build_model

    if checkpoint is None:
        meta = encoder / "encoder.json" if encoder.is_dir() else encoder.with_suffix(".json")
        checkpoint = json.loads(meta.read_text()).get("checkpoint") if meta.is_file() else None
        if not checkpoint or not Path(checkpoint).is_file():
            print(f"localmim analyze: no pre-training checkpoint ({checkpoint or 'none recorded'}); "
                  "skipping reconstructions", file=sys.stderr)
            return None
    payload = ckpt.load(checkpoint)
    model = build_model(PretrainConfig.model_validate(payload["params"]))
    model.load_state_dict(payload["model"])
    return model.to(dev).eval()


def _reconstructions(model, val_dir, cfg: AnalyzeConfig, dev, path: Path) -> str:
    from localmim.eval.analysis import reconstruct
    from localmim.eval.knn import iter_labelled_uint8
    from localmim.models.vit import LocalMIMViT
    from localmim.stages._analyze_plots import plot_reconstructions

    if model is None or cfg.recon_images == 0:
        return "skipped: no pre-training checkpoint" if model is None else "skipped: recon_images = 0"
    if not isinstance(model, LocalMIMViT):
        return "skipped: reconstructions are drawn for ViT pre-training models only"
    x, _ = next(iter_labelled_uint8(val_dir, cfg.recon_images, model.img_size, cfg.recon_images, 0))
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    mask, taps = reconstruct(model, x.to(dev), cfg.mask_ratio, gen)
    plot_reconstructions(x, mask.cpu(), taps, model.patch_size, model.target, model.hog_nbins, path)
    return f"{len(x)} images, taps {', '.join(t.name for t in taps)}, target {model.target}"


def _layers_csv(per_layer: dict[str, list[float]]) -> str:
    keys = [k for k, v in per_layer.items() if v]
    rows = [",".join(["block", *keys])]
    rows += [",".join([str(i + 1), *(f"{per_layer[k][i]:.6g}" for k in keys)]) for i in range(len(per_layer[keys[0]]))]
    return "\n".join(rows) + "\n"


def _summary(per_layer: dict[str, list[float]], taps: list[int], num_classes: int) -> dict[str, float]:
    probe, knn = per_layer["probe_top1"], per_layer["knn_top1"]
    out = {"probe_top1_last": probe[-1], "probe_top1_best": max(probe), "probe_best_layer": probe.index(max(probe)) + 1,
           "knn_top1_last": knn[-1], "knn_top1_best": max(knn), "knn_best_layer": knn.index(max(knn)) + 1,
           "chance_top1": 100.0 / num_classes, "num_layers": len(probe)}
    if per_layer["attn_nmi"]:
        out.update(attn_nmi_mean=sum(per_layer["attn_nmi"]) / len(probe), attn_nmi_first=per_layer["attn_nmi"][0],
                   attn_nmi_last=per_layer["attn_nmi"][-1],
                   attn_distance_px_mean=sum(per_layer["attn_distance_px"]) / len(probe))
    for k, t in enumerate(taps):
        out[f"tap{k + 1}_probe_top1"] = probe[t]
    return {k: float(v) for k, v in out.items()}

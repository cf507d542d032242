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
from localmim.pipeline import paths
from localmim.pipeline.stage import StageContext, StageError, flag, shared_flags, stage


@stage(
    "analyze",
    section="analyze",
    config=AnalyzeConfig,
    help="per-layer probe/kNN, attention NMI and distance, tap reconstructions of a pre-trained encoder",
    flags=[
        *shared_flags("analyze", "encoder"),
        flag("--checkpoint", default=None, help="pre-training checkpoint with the decoders (default: the one "
             "recorded in encoder.json; reconstructions are skipped when there is none)"),
        *shared_flags("analyze", "train", "val", "out", "metrics"),
        flag("--plots", default=paths.ANALYZE_PLOTS, help="per-block CSV (DVC plot; default: %(default)s)"),
        *shared_flags("analyze", "device"),
    ],
)
def run(cfg: AnalyzeConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.data.classify import num_classes_of
    from localmim.eval.analysis import is_swin, per_layer_scores
    from localmim.eval.analysis_plots import plot_layers
    from localmim.eval.layer_features import split_outputs
    from localmim.models.encoder_io import create_encoder, read_encoder
    from localmim.runtime.distributed import resolve_device
    from localmim.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    args, t0 = ctx.args, time.time()
    dev = resolve_device(cfg.device)
    enc = read_encoder(args.encoder)
    num_classes = num_classes_of(args.train)
    if not num_classes:
        raise StageError(f"{args.train}: class count unknown (no manifest 'classes')")
    net = create_encoder(enc, input_size=cfg.input_size).to(dev).eval()
    size = cfg.input_size or enc.img_size
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=dev)
    train = split_outputs(net, args.train, cfg.probe_train, 0, size, **kw)
    val = split_outputs(net, args.val, cfg.probe_val, cfg.attn_images, size, **kw)
    pretrain = _pretrain_model(args.checkpoint, Path(args.encoder), dev)
    swin = is_swin(net)
    scores = per_layer_scores(train.feats, train.labels, val.feats, val.labels, num_classes,
                              probe_steps=cfg.probe_steps, weight_decay=cfg.probe_weight_decay, k=cfg.knn_k,
                              temperature=cfg.knn_temperature)
    per_layer = {**scores, "attn_nmi": [float(x.mean()) for x in val.nmi],
                 "attn_distance_px": [float(x.mean()) for x in val.dist]}
    taps = [int(t) for t in getattr(pretrain, "taps", [])] if pretrain is not None and not swin else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "layers.png", plot_layers(per_layer, taps, title=f"{enc.timm_name} ({len(train.labels)} "
                       f"train / {len(val.labels)} val images, {num_classes} classes)"))
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


def _pretrain_model(checkpoint: str | None, encoder: Path, dev):
    """The full pre-training model (encoder + decoders) of ``checkpoint`` or of the one recorded in
    ``encoder.json``; None when there is none."""
    import json

    from localmim.models.encoder_io import load_pretrain_model

    if checkpoint is None:
        meta = encoder / "encoder.json" if encoder.is_dir() else encoder.with_suffix(".json")
        checkpoint = json.loads(meta.read_text()).get("checkpoint") if meta.is_file() else None
        if not checkpoint or not Path(checkpoint).is_file():
            print(f"localmim analyze: no pre-training checkpoint ({checkpoint or 'none recorded'}); "
                  "skipping reconstructions", file=sys.stderr)
            return None
    return load_pretrain_model(checkpoint, dev)


def _reconstructions(model, val_dir, cfg: AnalyzeConfig, dev, path: Path) -> str:
    from localmim.eval.analysis import reconstruct
    from localmim.eval.analysis_plots import plot_reconstructions
    from localmim.eval.layer_features import first_images
    from localmim.models.vit import LocalMIMViT
    from localmim.utils.io import atomic_write_bytes

    if model is None or cfg.recon_images == 0:
        return "skipped: no pre-training checkpoint" if model is None else "skipped: recon_images = 0"
    if not isinstance(model, LocalMIMViT):
        return "skipped: reconstructions are drawn for ViT pre-training models only"
    x = first_images(val_dir, cfg.recon_images, model.img_size)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    mask, taps = reconstruct(model, x.to(dev), cfg.mask_ratio, gen)
    atomic_write_bytes(path, plot_reconstructions(x, mask.cpu(), taps, model.patch_size, model.target,
                                                  model.hog_nbins))
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

"""``localmim linprobe --encoder data/pretrain --out data/linprobe``: MAE linear probe of the frozen encoder.

Outputs: ``OUT/head.pt`` (the best probe head: BatchNorm1d(affine=False) + Linear state dict), ``OUT/params.yaml``
and ``metrics/linprobe.json`` (top1, top5, best_top1, epochs, seconds, chance_top1 = 100 / classes); per-epoch
metrics to MLflow. Single process (features are extracted once and cached; see :mod:`localmim.train.linprobe`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from localmim.config.linprobe import LinprobeConfig
from localmim.pipeline.stage import StageContext, shared_flags, stage


@stage(
    "linprobe",
    section="linprobe",
    config=LinprobeConfig,
    help="linear probe of the frozen exported encoder (BatchNorm without affine + linear head, MAE protocol)",
    flags=shared_flags("linprobe", "encoder", "train", "val", "out", "metrics", "epochs", "device"),
)
def run(cfg: LinprobeConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.data.classify import num_classes_of
    from localmim.models.encoder_io import read_encoder
    from localmim.train.linprobe import linprobe
    from localmim.utils.io import atomic_torch_save

    args = ctx.args
    enc = read_encoder(args.encoder)
    res = linprobe(cfg, enc, train_dir=args.train, val_dir=args.val, log_fn=ctx.tracker.log_metrics)
    out = Path(args.out)
    ctx.dump_params(cfg, out)
    atomic_torch_save(res.state["head"], out / "head.pt")
    m = res.metrics
    metrics = {k: m[k] for k in ("top1", "top5", "best_top1", "best_epoch")} | {"epochs": m["epochs_done"]} | {
        "seconds": m["seconds"], "chance_top1": 100.0 / num_classes_of(args.train)}  # the baseline of top1
    ctx.write_metrics(args.metrics, metrics)
    print(f"localmim linprobe: top-1 {m['top1']:.2f} (best {m['best_top1']:.2f} @ epoch {m['best_epoch']}), "
          f"top-5 {m['top5']:.2f}, {m['epochs_done']} epochs, {m['seconds']:.1f}s -> {out}", file=sys.stderr)
    return {k: float(v) for k, v in metrics.items()}

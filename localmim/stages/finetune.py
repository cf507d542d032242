"""``localmim finetune --encoder data/pretrain --out data/finetune``: method §8 fine-tuning of the exported encoder.

Outputs: the saved classifier (:mod:`localmim.models.artifact`, ``load_model(OUT)``): ``OUT/best.pt`` (the best
epoch's weights, the ones ``OUT/model.json`` names) and ``OUT/last.pt`` (the last epoch's: ``load_model(OUT,
weights="last.pt")``); the spec in ``model.json`` is ``create_timm_model(timm_name, head, **timm_kwargs)``, which for
ViT is plain timm (``timm.create_model`` for a registered name, else ``timm.models.VisionTransformer(**kwargs)``);
Swin is timm's ``SwinTransformer`` with the method §8.2 pooled-LayerNorm head. ``OUT/params.yaml`` and
``metrics/finetune.json`` (top1, top5, best_top1, epochs, seconds, chance_top1 = 100 /
classes). Resumable checkpoints live in ``--ckpt-dir/<run key>`` (outside the DAG's declared outputs, which DVC
deletes before a re-run). Per-epoch metrics (train loss, lr, val top-1/top-5/loss) go to MLflow. Runs under torchrun
for DDP.
"""

from __future__ import annotations

import sys
from pathlib import Path

from localmim.config.finetune import FinetuneConfig
from localmim.pipeline.stage import StageContext, shared_flags, stage


@stage(
    "finetune",
    section="finetune",
    config=FinetuneConfig,
    help="fine-tune a timm classifier from the exported encoder (layer decay, mixup/cutmix, RandAugment)",
    flags=shared_flags("finetune", "encoder", "train", "val", "out", "ckpt-dir", "metrics", "epochs", "batch-size",
                       "lr", "device"),
    system_metrics=True,
)
def run(cfg: FinetuneConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.models.encoder_io import read_encoder
    from localmim.runtime.distributed import process_group
    from localmim.train.finetune import FinetuneData, finetune

    args = ctx.args
    enc = read_encoder(args.encoder)
    with process_group(cfg.device) as dist:
        if ctx.is_main:
            ctx.dump_params(cfg, args.out)
        res = finetune(cfg, enc, FinetuneData(args.train, args.val, args.ckpt_dir), log_fn=ctx.tracker.log_metrics,
                       dist=dist)
        if dist.is_main:
            write_outputs(res, res.run_dir, args.out)
    m = res.metrics
    metrics = {k: m[k] for k in ("top1", "top5", "best_top1", "best_epoch")} | {"epochs": m["epochs_done"]} | {
        k: m[k] for k in ("seconds", "val_samples")} | {"chance_top1": 100.0 / res.state["spec"].num_classes}
    if ctx.is_main:
        ctx.write_metrics(args.metrics, metrics)
        ctx.tracker.log_artifact(Path(args.out) / "model.json")
        ctx.tracker.log_artifact(Path(args.out) / "best.pt")
        print(f"localmim finetune: top-1 {m['top1']:.2f} (best {m['best_top1']:.2f} @ epoch {m['best_epoch']}), "
              f"top-5 {m['top5']:.2f}, {m['epochs_done']} epochs, {m['seconds']:.1f}s -> {args.out}",
              file=sys.stderr)
    return {k: float(v) for k, v in metrics.items()}


def write_outputs(res, ckpt_dir: str | Path, out_dir: str | Path) -> None:
    """Save the classifier into ``out_dir``: the weights of the best epoch (``best.pt``, kept in the run's
    ``ckpt_dir``) with ``model.json`` (its spec; best epoch / top-1), and the last epoch's as ``last.pt``."""
    import torch

    from localmim.models.artifact import save_model

    def weights(name: str) -> dict:
        return torch.load(Path(ckpt_dir) / name, map_location="cpu", weights_only=True)

    save_model(out_dir, weights("best.pt"), res.state["spec"], weights_file="best.pt",
               other_weights={"last.pt": weights("last.pt")},
               info={"best_epoch": res.metrics["best_epoch"], "best_top1": res.metrics["best_top1"]})

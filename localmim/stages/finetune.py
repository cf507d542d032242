"""``localmim finetune --encoder data/pretrain --out data/finetune``: method §8 fine-tuning of the exported encoder.

Outputs: ``OUT/best.pt`` and ``OUT/last.pt`` (state dicts of the model ``OUT/model.json`` describes:
``localmim.models.encoder_io.create_timm_model(timm_name, head, **timm_kwargs)``, which for ViT is plain timm,
``timm.create_model`` for a registered name, else ``timm.models.VisionTransformer(**kwargs)``; Swin is timm's
``SwinTransformer`` with the method §8.2 pooled-LayerNorm head; ``load_state_dict(torch.load(p, weights_only=True))``),
``OUT/params.yaml`` and ``metrics/finetune.json`` (top1, top5, best_top1, epochs, seconds, chance_top1 = 100 /
classes). Resumable checkpoints live in ``--ckpt-dir/<run key>`` (outside the DAG's declared outputs, which DVC
deletes before a re-run). Per-epoch metrics (train loss, lr, val top-1/top-5/loss) go to MLflow. Runs under torchrun
for DDP.
"""

from __future__ import annotations

import sys
from pathlib import Path

from localmim.config.finetune import FinetuneConfig
from localmim.pipeline.stage import StageContext, StageError, shared_flags, stage


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
    try:
        enc = read_encoder(args.encoder)
    except (ValueError, FileNotFoundError) as e:
        raise StageError(str(e)) from None
    with process_group(cfg.device) as dist:
        try:
            if ctx.is_main:
                ctx.dump_params(cfg, args.out)
            res = finetune(cfg, enc, FinetuneData(args.train, args.val, args.ckpt_dir),
                           log_fn=ctx.tracker.log_metrics, dist=dist)
            if dist.is_main:
                write_outputs(res, res.run_dir, args.out)
        except (ValueError, FloatingPointError) as e:
            raise StageError(str(e)) from None
    m, recipe = res.metrics, res.state["recipe"]
    metrics = {k: m[k] for k in ("top1", "top5", "best_top1", "best_epoch", "seconds", "val_samples")} | {
        "epochs": m["epochs_done"], "chance_top1": 100.0 / recipe["timm_kwargs"]["num_classes"]}  # top1's baseline
    if ctx.is_main:
        ctx.write_metrics(args.metrics, metrics)
        ctx.tracker.log_artifact(Path(args.out) / "model.json")
        ctx.tracker.log_artifact(Path(args.out) / "best.pt")
        print(f"localmim finetune: top-1 {m['top1']:.2f} (best {m['best_top1']:.2f} @ epoch {m['best_epoch']}), "
              f"top-5 {m['top5']:.2f}, {m['epochs_done']} epochs, {m['seconds']:.1f}s -> {args.out}",
              file=sys.stderr)
    return {k: float(v) for k, v in metrics.items()}


def write_outputs(res, ckpt_dir: str | Path, out_dir: str | Path) -> None:
    """Copy ``best.pt`` / ``last.pt`` from the run's ``ckpt_dir`` into ``out_dir`` (temp name, then rename) and write
    ``model.json`` (timm name + kwargs, best epoch / top-1) next to them."""
    import shutil

    from localmim.utils.io import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("best.pt", "last.pt"):
        shutil.copyfile(Path(ckpt_dir) / name, out / f".{name}.tmp")
        (out / f".{name}.tmp").replace(out / name)
    atomic_write_json(out / "model.json", res.state["recipe"])

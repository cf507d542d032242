"""``localmim pretrain --out DIR``: masked image modeling pre-training (method §7), exported as a timm encoder.

Launch under ``torchrun`` for several processes (the DAG does: ``pretrain.nproc_per_node``). Reads the raw
train shards (``pretrain.data: online``) or the view shards of ``localmim targets`` (``views``). Resumable
checkpoints live in ``--ckpt-dir`` (outside the DAG's declared outputs, which DVC deletes before a re-run).

Outputs (rank 0): ``OUT/encoder.pt`` (a plain timm state dict, ``weights_only``-loadable), ``OUT/encoder.json``
(``timm_name`` saying what the model is, ``timm_kwargs`` with the whole architecture: see
``localmim.models.encoder_io`` for building it in timm; plus provenance), ``OUT/params.yaml`` and the
metrics file. MLflow: params, losses at x = the optimizer step (``epoch`` logged as a second axis), lr, throughput,
memory, the kNN monitor, system metrics, and the exported encoder as an artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path

from localmim.config.pretrain import PretrainConfig
from localmim.pipeline import paths
from localmim.pipeline.stage import StageContext, flag, shared_flags, stage


@stage(
    "pretrain",
    section="pretrain",
    config=PretrainConfig,
    help="masked-image-modeling pre-training (LocalMIM or MAE baseline); exports the encoder for timm",
    flags=[
        *shared_flags("pretrain", "out"),
        flag("--shards", default=paths.shards("train"), help="raw train shards (data: online)"),
        flag("--views-dir", default=paths.VIEWS, help="view shards of `localmim targets` (data: views)"),
        *shared_flags("pretrain", "ckpt-dir", "metrics"),
        flag("--knn-val", default=None, help="val shards of the kNN monitor (default: val/ next to --shards)"),
        flag("--imported", default=None, metavar="DIR",
             help="start from an imported encoder: when DIR holds one (`localmim import`), copy it to --out instead "
                  "of training (the DAG's way to skip pre-training: imported.source)"),
        *shared_flags("pretrain", "epochs"),
        flag("--data", key="data", choices=["online", "views"], help="input: raw shards or view shards"),
        flag("--model", key="model", metavar="NAME", help="localmim.models registry name"),
        *shared_flags("pretrain", "device", "no-progress"),
    ],
    system_metrics=True,
    inputs=lambda cfg, a: {"train": a.views_dir if cfg.data == "views" else a.shards, "imported": a.imported},
)
def run(cfg: PretrainConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.eval.knn import build_knn_monitor
    from localmim.runtime.distributed import barrier, process_group
    from localmim.train.pretrain import run_pretrain

    args = ctx.args
    if args.imported and (Path(args.imported) / "encoder.json").is_file():
        return _use_imported(Path(args.imported), Path(args.out), args.metrics, ctx)
    data_dir = Path(args.views_dir if cfg.data == "views" else args.shards)
    log = lambda m, step: ctx.tracker.log_metrics(m, step=step)
    with process_group(cfg.device) as dist:
        monitor = build_knn_monitor(cfg, Path(args.shards), args.knn_val, ctx.is_main)
        result = run_pretrain(cfg, data_dir, args.ckpt_dir, log, monitor=monitor, progress=not args.no_progress,
                              dist=dist)
        # every monitored epoch, those before a resume included (rows: step, epoch, knn_top1, knn_seconds)
        knn_history = [{k: v for k, v in r.items() if k != "step"} for r in result.history]
        metrics = {k: float(v) for k, v in result.metrics.items() if k not in ("step", "epoch")}
        if ctx.is_main:
            _write_outputs(cfg, ctx, result, metrics, knn_history)
        barrier()
    return metrics if ctx.is_main else {}


def _write_outputs(cfg: PretrainConfig, ctx: StageContext, result, metrics: dict, knn_history: list) -> None:
    """The exported encoder, params and metrics (rank 0)."""
    from localmim.models.encoder_io import write_encoder
    from localmim.utils.io import atomic_write_json

    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    # encoder.json is a DVC-tracked output: only what params, data and code determine (the git commit, run id and
    # times are in the MLflow run and the checkpoint), so a rerun with equal weights leaves it unchanged
    extra = {"model": cfg.model, "pretrain_params": cfg.to_dict(),
             "checkpoint": str(result.checkpoint) if result.checkpoint else None}
    write_encoder(result.model, out, extra)
    ctx.dump_params(cfg, out)
    ctx.write_metrics(ctx.args.metrics, metrics)
    if knn_history:  # kNN top-1 per monitored epoch; its cost (knn_seconds) is a time: MLflow and timing file only
        atomic_write_json(out / "knn.json", [{k: v for k, v in r.items() if k != "knn_seconds"} for r in knn_history])
    ctx.tracker.log_artifact(out, artifact_path="encoder")
    print(f"localmim pretrain: loss {metrics.get('final_loss', float('nan')):.4f} after "
          f"{int(metrics.get('epochs_done', 0))} epochs -> {out}", file=sys.stderr)


def _use_imported(src: Path, out: Path, metrics_file: str, ctx: StageContext) -> dict[str, float]:
    """Copy the imported encoder (and its ``params.yaml``) to ``out``, no training: ``out`` then depends on the
    import only, not on the ``pretrain`` params (DVC sees the same output for any of them)."""
    import shutil

    from localmim.utils.io import tmp_name

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("knn.json", "params.yaml"):  # a previous training run's
            (out / stale).unlink(missing_ok=True)
        for name in ("encoder.pt", "encoder.json", "params.yaml"):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp_name(out / name))
                tmp_name(out / name).replace(out / name)
        ctx.write_metrics(metrics_file, {"imported": 1.0})
        ctx.tracker.set_tags({"imported": str(src)})
        print(f"localmim pretrain: {src} holds an imported encoder: copied to {out}, no pre-training", file=sys.stderr)
    return {"imported": 1.0} if ctx.is_main else {}

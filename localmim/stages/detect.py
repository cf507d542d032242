"""``localmim detect --encoder data/pretrain --data data/raw/coco --out data/detect``: COCO detection and instance
segmentation with Mask R-CNN on the exported encoder (method §9.2).

Outputs (``OUT``): ``model.pt`` + ``model.json``, the saved detector (:mod:`localmim.models.artifact`,
``load_model(OUT)``; ``info`` maps its labels to COCO category ids and names),
``detections_val.json`` (COCO results format: bbox + RLE segmentation + score, re-scorable with pycocotools),
``val_predictions.png`` (a few val images with predicted masks and boxes), ``data_report.json`` (images and
annotations found / used / skipped with reasons, load-time skips included, and notes on usable files worth
naming) and ``params.yaml``; ``metrics/detect.json`` with COCOeval's
AP, AP50, AP75, APs, APm, APl for ``bbox_*`` and ``segm_*`` (0..1, as pycocotools reports them) and their chance
level (``{bbox,segm}_{AP,AP50}_prior``: the training boxes and masks guessed on every val image). Resumable
checkpoints live in ``--ckpt-dir/<run key>``. The stage checks both splits; :func:`localmim.train.detect.run_detect`
builds the detector and the datasets from them. Per-iteration losses and per-epoch metrics go to MLflow. Runs under
torchrun.

Every image is fully decoded before training (rank 0, worker processes; cached in ``CKPT_DIR/image-check.json`` by
path, size and mtime, so a rerun or resume decodes only new or changed files). A file that fails to load during
the run (damaged after the check) is skipped with a record in ``CKPT_DIR/load-skips-*.jsonl`` (``on_bad: skip``;
training substitutes the next image, evaluation leaves the image out of predictions and scoring alike) or stops
the run with one line naming it (``fail``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from localmim.config.detect import DetectConfig
from localmim.pipeline import paths
from localmim.pipeline.stage import StageContext, StageError, flag, shared_flags, stage


@stage(
    "detect",
    section="detect",
    config=DetectConfig,
    help="COCO detection / instance segmentation: Mask R-CNN on the exported encoder (box and mask AP)",
    flags=[
        *shared_flags("detect", "encoder"),
        flag("--data", default=paths.raw("coco"), help="COCO root: train2017/, val2017/, annotations/, or its dataset "
                                                      "manifest (data/raw/coco.json) (default: %(default)s)"),
        *shared_flags("detect", "out", "ckpt-dir", "metrics", "epochs", "batch-size", "lr", "device"),
    ],
    system_metrics=True,
)
def run(cfg: DetectConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.models.encoder_io import read_encoder
    from localmim.runtime.distributed import process_group
    from localmim.train.detect import run_detect

    args = ctx.args
    enc = read_encoder(args.encoder)
    with process_group(cfg.device) as dist:
        train, val, skips = _splits(cfg, args, ctx.is_main)
        if ctx.is_main:
            ctx.dump_params(cfg, args.out)
        res = run_detect(cfg, enc, train, val, args.ckpt_dir, dist=dist, log_fn=ctx.tracker.log_metrics, skips=skips)
    for name, split in (("train", train), ("val", val)):  # load-time skips move from used to skipped
        split.report.add_load_skips(split.coco, split.image_dir, skips[name].records())
    m = res.metrics
    metrics = {k: v for k, v in m.items() if k.startswith(("bbox_", "segm_"))} | {
        "epochs": m["epochs_done"], "seconds": m["seconds"], "train_images_per_s": m["train_images_per_s"],
        "train_images": train.report.images_used, "val_images": val.report.images_used,
        "skipped": len(train.report.skipped) + len(val.report.skipped)}
    if ctx.is_main:
        metrics |= _prior_metrics(train, val, skips["val"])
        _write_outputs(cfg, ctx, enc, train, val, res, metrics)
    return {k: float(v) for k, v in metrics.items()}


def _prior_metrics(train, val, val_skips) -> dict[str, float]:
    """Box and mask AP / AP50 of guesses that never look at the image (the training boxes on every val image,
    :func:`localmim.eval.detection.prior_results`), scored on the val images the detector was scored on: the chance
    level of the headline numbers (``*_prior``)."""
    from localmim.eval.detection import ScoredGroundTruth, coco_eval, prior_results

    gt = ScoredGroundTruth(val, val_skips)
    m = coco_eval(gt, prior_results(train.coco, gt))
    return {f"{k}_prior": m[k] for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")}


def _splits(cfg: DetectConfig, args, is_main: bool):
    """Both splits checked (rank 0 decodes every image, cached in the checkpoint directory; the other ranks reuse
    its results) and each split's load-time rule."""
    from localmim.data.dense.coco import CocoError, load_coco
    from localmim.data.raw.datasets import dataset_root
    from localmim.data.raw.imagefile import LoadSkips, file_stats, load_skip_log
    from localmim.runtime.distributed import broadcast_object

    splits: dict = {}
    checks: dict | str = {}
    data = args.data
    if is_main:
        try:
            data = dataset_root(args.data)  # a manifest names the folder
            cache = Path(args.ckpt_dir) / "image-check.json"
            splits = {s: load_coco(data, s, cfg.on_bad, train=s == "train", cache=cache, progress=True)
                      for s in ("train", "val")}
            checks = {s: sp.checks for s, sp in splits.items()}
        except (ValueError, FileNotFoundError, CocoError) as e:
            checks = str(e)
    checks, data = broadcast_object((checks, str(data)))
    if isinstance(checks, str):
        raise StageError(checks)
    if not is_main:
        splits = {s: load_coco(data, s, cfg.on_bad, train=s == "train", checks=checks[s])
                  for s in ("train", "val")}
    train, val = splits["train"], splits["val"]
    for name, split in splits.items():
        if not split.report.images_used:
            raise StageError(f"{data}: no usable {name} images (see the skipped list: "
                             f"{split.report.skipped[:3]})")
        if split.cat_ids != train.cat_ids:
            raise StageError(f"{data}: train and val list different categories")
        if is_main and (split.report.skipped or split.report.notes):
            print(f"localmim detect: {name}: {len(split.report.skipped)} skipped, {len(split.report.notes)} "
                  "note(s) (see data_report.json)", file=sys.stderr)
    used = [str(sp.image_dir / img["file_name"]) for sp in splits.values() for img in sp.coco.imgs.values()]
    log = load_skip_log(args.ckpt_dir, {"run": cfg.to_dict(), "files": file_stats(used)})
    return train, val, {s: LoadSkips(log, cfg.on_bad, s) for s in splits}


def _write_outputs(cfg: DetectConfig, ctx: StageContext, enc, train, val, res, metrics: dict) -> None:
    from torchvision.io import encode_png

    from localmim.eval.detection import render
    from localmim.models.artifact import save_model
    from localmim.models.detection import DetectorSpec
    from localmim.utils.io import atomic_write_bytes, atomic_write_json

    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "detections_val.json", res.state["results"])
    cat_names = {c: val.coco.cats[c]["name"] for c in val.cat_ids}
    grid = render(res.state["kept"], cat_names, val.label_to_cat)
    atomic_write_bytes(out / "val_predictions.png", bytes(encode_png(grid).numpy()))
    save_model(out, res.model.state_dict(), DetectorSpec.from_config(cfg, num_classes=len(train.cat_ids)), encoder=enc,
               info={"label_to_category": {str(k): v for k, v in val.label_to_cat.items()},
                     "categories": {str(c): name for c, name in cat_names.items()}})
    atomic_write_json(out / "data_report.json", {"train": train.report.to_dict(), "val": val.report.to_dict()})
    ctx.write_metrics(ctx.args.metrics, metrics)
    for name in ("detections_val.json", "val_predictions.png", "model.json", "data_report.json"):
        ctx.tracker.log_artifact(out / name)
    bb, sg = metrics.get("bbox_AP", 0.0), metrics.get("segm_AP", 0.0)
    print(f"localmim detect: box AP {bb:.4f}, mask AP {sg:.4f} ({metrics['epochs']} epochs, {metrics['seconds']:.1f}s, "
          f"{metrics['train_images_per_s']:.1f} train images/s) -> {out}", file=sys.stderr)

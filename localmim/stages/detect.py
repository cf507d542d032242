"""``localmim detect --encoder data/pretrain --data data/raw/coco --out data/detect``: COCO detection and instance
segmentation with Mask R-CNN on the exported encoder (method §9.2).

Outputs (``OUT``): ``model.pt`` (the detector's state dict; ``model.json`` holds what rebuilds it:
:func:`localmim.models.detection.build_mask_rcnn` with the encoder spec and the ``detect`` params),
``detections_val.json`` (COCO results format: bbox + RLE segmentation + score, re-scorable with pycocotools),
``val_predictions.png`` (a few val images with predicted masks and boxes), ``data_report.json`` (images and
annotations found / used / skipped with reasons) and ``params.yaml``; ``metrics/detect.json`` with COCOeval's
AP, AP50, AP75, APs, APm, APl for ``bbox_*`` and ``segm_*`` (0..1, as pycocotools reports them). Resumable
checkpoints live in ``--ckpt-dir``. Per-iteration losses and per-epoch metrics go to MLflow. Runs under torchrun.
"""

from __future__ import annotations

import sys
from pathlib import Path

from localmim.config.detect import DetectConfig
from localmim.pipeline.stage import StageContext, StageError, flag, stage


@stage(
    "detect",
    section="detect",
    config=DetectConfig,
    help="COCO detection / instance segmentation: Mask R-CNN on the exported encoder (box and mask AP)",
    flags=[
        flag("--encoder", default="data/pretrain", help="exported encoder: directory or .pt (default: %(default)s)"),
        flag("--data", default="data/raw/coco", help="COCO root: train2017/, val2017/, annotations/, or its dataset "
                                                      "manifest (data/raw/coco.json) (default: %(default)s)"),
        flag("--out", default="data/detect", help="output directory (default: %(default)s)"),
        flag("--ckpt-dir", default="data/checkpoints/detect", help="resumable checkpoints (default: %(default)s)"),
        flag("--metrics", default="metrics/detect.json", help="metrics file (default: %(default)s)"),
        flag("--epochs", key="epochs", type=int, metavar="N", help="epochs"),
        flag("--batch-size", key="batch_size", type=int, metavar="N", help="batch size per device"),
        flag("--lr", key="lr", type=float, metavar="LR", help="absolute peak lr"),
        flag("--device", key="device", choices=["auto", "cpu", "cuda"], help="device"),
    ],
    system_metrics=True,
)
def run(cfg: DetectConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.data.coco import CocoError, load_coco
    from localmim.data.datasets import dataset_root
    from localmim.models.encoder_io import read_encoder
    from localmim.utils.distributed import cleanup, init_distributed

    args = ctx.args
    try:
        enc = read_encoder(args.encoder)
        data = dataset_root(args.data)  # a manifest names the folder
        train = load_coco(data, "train", cfg.on_bad, train=True)
        val = load_coco(data, "val", cfg.on_bad)
    except (ValueError, FileNotFoundError, CocoError) as e:
        raise StageError(str(e)) from None
    for name, split in (("train", train), ("val", val)):
        if not split.report.images_used:
            raise StageError(f"{data}: no usable {name} images (see the skipped list: "
                             f"{split.report.skipped[:3]})")
        if split.cat_ids != train.cat_ids:
            raise StageError(f"{data}: train and val list different categories")
    dist = init_distributed(cfg.device)
    try:
        if ctx.is_main:
            ctx.dump_params(cfg, args.out)
        res = _train(cfg, ctx, enc, train, val, dist)
    except (ValueError, FloatingPointError) as e:
        raise StageError(str(e)) from None
    finally:
        cleanup()
    metrics = dict(res.metrics) | {"epochs": res.epochs, "seconds": res.seconds,
                                   "train_images_per_s": res.train_images_per_s,
                                   "train_images": train.report.images_used, "val_images": val.report.images_used,
                                   "skipped": len(train.report.skipped) + len(val.report.skipped)}
    if ctx.is_main:
        _write_outputs(cfg, ctx, enc, train, val, res, metrics)
    return {k: float(v) for k, v in metrics.items()}


def _train(cfg: DetectConfig, ctx: StageContext, enc, train, val, dist):
    from localmim.data.coco import coco_dataset, eval_transforms, train_transforms
    from localmim.models.detection import build_mask_rcnn
    from localmim.train.detect import seed_everything, train_detector
    from localmim.train.finetune import _sd_fingerprint

    seed_everything(cfg.seed)  # the same initial model on every rank
    model = build_mask_rcnn(enc, len(train.cat_ids), **_model_kwargs(cfg))
    seed_everything(cfg.seed + dist.rank)
    train_set = coco_dataset(train, train_transforms(train, cfg.augment, cfg.image_size, cfg.scale_range))
    val_set = coco_dataset(val, eval_transforms(val))
    counts = {s: {"images": r.images_used, "annotations": r.annotations_used}
              for s, r in (("train", train.report), ("val", val.report))}
    params = {"detect": cfg.to_dict(), "encoder": _sd_fingerprint(enc.state_dict), "data": counts}
    return train_detector(cfg, model, train_set, val_set, val.coco, val.label_to_cat, ckpt_dir=ctx.args.ckpt_dir,
                          params=params, dist=dist, log_fn=ctx.tracker.log_metrics)


def _model_kwargs(cfg: DetectConfig) -> dict:
    return dict(image_size=cfg.image_size, max_size=cfg.max_size, train_scales=list(cfg.train_scales),
                drop_path=cfg.drop_path, pretrained=cfg.pretrained, anchor_size=cfg.anchor_size,
                window_size=cfg.window_size, global_blocks=list(cfg.global_blocks),
                rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
                box_batch_size_per_image=cfg.box_batch_size_per_image, detections_per_img=cfg.detections_per_img,
                box_head_dim=cfg.box_head_dim, mask_head_channels=cfg.mask_head_channels)


def _write_outputs(cfg: DetectConfig, ctx: StageContext, enc, train, val, res, metrics: dict) -> None:
    from torchvision.io import encode_png

    from localmim.eval.detection import render
    from localmim.utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_json

    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "detections_val.json", res.results)
    cat_names = {c: val.coco.cats[c]["name"] for c in val.cat_ids}
    grid = render(res.kept, cat_names, val.label_to_cat)
    atomic_write_bytes(out / "val_predictions.png", bytes(encode_png(grid).numpy()))
    atomic_torch_save({k: v.detach().cpu() for k, v in res.state_dict.items()}, out / "model.pt")
    atomic_write_json(out / "model.json", {
        "build": "localmim.models.detection.build_mask_rcnn", "timm_name": enc.timm_name,
        "timm_kwargs": dict(enc.timm_kwargs), "num_classes": len(val.cat_ids),
        "kwargs": _model_kwargs(cfg) | {"pretrained": False},
        "label_to_category": {str(k): v for k, v in val.label_to_cat.items()}, "categories": cat_names,
        "note": "build_mask_rcnn(EncoderSpec(timm_name, timm_kwargs, {}), num_classes, **kwargs), then "
                "load_state_dict(torch.load('model.pt', weights_only=True))"})
    atomic_write_json(out / "data_report.json", {"train": train.report.to_dict(), "val": val.report.to_dict()})
    atomic_write_json(ctx.args.metrics, metrics)
    for name in ("detections_val.json", "val_predictions.png", "model.json", "data_report.json"):
        ctx.tracker.log_artifact(out / name)
    bb, sg = metrics.get("bbox_AP", 0.0), metrics.get("segm_AP", 0.0)
    print(f"localmim detect: box AP {bb:.4f}, mask AP {sg:.4f} ({res.epochs} epochs, {res.seconds:.1f}s, "
          f"{res.train_images_per_s:.1f} train images/s) -> {out}", file=sys.stderr)

"""``localmim segment --encoder data/pretrain --data data/raw/ade20k --out data/segment``: ADE20K semantic
segmentation with UperNet on the exported encoder (method §9.1).

Both splits are validated before training (``segment.on_bad``: skip with reasons | fail). Outputs (rank 0, the
whole directory appears at once: built under ``.<out>.staging`` and renamed):

- ``OUT/model.pt`` (the segmenter's state dict, ``weights_only``-loadable) + ``OUT/model.json`` (how to rebuild it);
- ``OUT/pred/<annotation name>.png``: one label map per val image in ADE20K's convention (class k -> k + 1,
  0 never predicted), at the annotation's size, so any ADE20K scorer can re-score them;
- ``OUT/grid.png``: image | ground truth | prediction for the first ``num_vis`` val images (fixed palette);
- ``OUT/per_class.csv`` and ``OUT/params.yaml``;
- ``metrics/segment.json``: mIoU, mAcc, aAcc (percent), per-class IoU/Acc (null: class left out), the split
  counts (found = used + skipped) with every skipped file and its reason, throughput.

MLflow: params, per-iteration loss/lr, eval metrics with their step, the grid and the per-class table.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np

from localmim.config.segment import SegmentConfig
from localmim.pipeline.stage import StageContext, StageError, flag, stage


def palette(n: int = 256) -> np.ndarray:
    """Fixed ``[n, 3]`` uint8 colours: 0 (ignore / unlabelled) black, then well-spread deterministic colours."""
    rng = np.random.default_rng(20230228)
    pal = rng.integers(40, 256, (n, 3), dtype=np.uint8)
    pal[0] = 0
    return pal


def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    import io

    from PIL import Image

    from localmim.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_grid(path: Path, rows: list[tuple[Path, Path, Path]]) -> None:
    """One row per (image, annotation, prediction) file: image | ground truth | prediction, colours by
    :func:`palette` (ADE20K label values, 0 black)."""
    from PIL import Image

    pal = palette()
    tiles = []
    for img_p, ann_p, pred_p in rows:
        with Image.open(img_p) as im, Image.open(ann_p) as an, Image.open(pred_p) as pr:
            tiles.append([np.asarray(im.convert("RGB")), pal[np.asarray(an)], pal[np.asarray(pr)]])
    gap = 4
    width = max(sum(t.shape[1] for t in row) + gap * 2 for row in tiles)
    height = sum(row[0].shape[0] for row in tiles) + gap * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for row in tiles:
        x = 0
        for t in row:
            canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + gap
        y += row[0].shape[0] + gap
    _png(path, canvas, "RGB")


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 4) for v in values]


@stage(
    "segment",
    section="segment",
    config=SegmentConfig,
    help="ADE20K semantic segmentation: UperNet on the exported encoder (mIoU, label-map PNGs)",
    flags=[
        flag("--encoder", default="data/pretrain", help="exported encoder: directory or .pt (default: %(default)s)"),
        flag("--data", default="data/raw/ade20k", help="ADE20K release folder, or its dataset manifest "
                                                        "(data/raw/ade20k.json) (default: %(default)s)"),
        flag("--out", default="data/segment", help="output directory (default: %(default)s)"),
        flag("--ckpt-dir", default="data/checkpoints/segment", help="resumable checkpoints (default: %(default)s)"),
        flag("--metrics", default="metrics/segment.json", help="metrics file (default: %(default)s)"),
        flag("--iters", key="iters", type=int, metavar="N", help="training iterations"),
        flag("--device", key="device", choices=["auto", "cpu", "cuda"], help="device"),
        flag("--no-progress", action="store_true", help="no progress bar"),
    ],
    system_metrics=True,
)
def run(cfg: SegmentConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.data.ade20k import scan_split
    from localmim.data.datasets import dataset_root
    from localmim.models.encoder_io import read_encoder
    from localmim.train.segment import run_segment
    from localmim.utils.distributed import barrier, broadcast_object, cleanup, init_distributed

    args = ctx.args
    init_distributed(cfg.device)  # the process group, before the first collective
    try:
        enc = read_encoder(args.encoder)
    except (ValueError, FileNotFoundError) as e:
        raise StageError(str(e)) from None
    scans: dict | str = {}
    if ctx.is_main:  # validated once (every annotation is decoded), shared with the other ranks
        try:
            data = dataset_root(args.data)  # a manifest names the folder
            scans = {s: scan_split(data, s, cfg.num_classes, cfg.on_bad) for s in ("train", "val")}
        except (ValueError, FileNotFoundError) as e:
            scans = str(e)
    scans = broadcast_object(scans)
    if isinstance(scans, str):
        raise StageError(scans)
    for s, sc in scans.items():
        if sc.skipped and ctx.is_main:
            print(f"localmim segment: {s}: skipped {len(sc.skipped)} of {sc.found} (see the metrics file)",
                  file=sys.stderr)
    out = Path(args.out)
    staging = out.with_name(f".{out.name}.staging")
    val_pairs = scans["val"].pairs
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "pred").mkdir(parents=True)
    barrier()

    def on_pred(idx: int, pred) -> None:  # ADE20K convention: class k -> k + 1 (0 = ignore, never predicted)
        _png(staging / "pred" / val_pairs[idx].annotation.name, (pred + 1).to("cpu").numpy().astype(np.uint8))

    try:
        res = run_segment(cfg, enc, scans["train"].pairs, val_pairs, args.ckpt_dir, on_pred=on_pred,
                          log_fn=lambda m, step: ctx.tracker.log_metrics(m, step=step),
                          progress=not args.no_progress)
    except (ValueError, FloatingPointError) as e:
        raise StageError(f"segment: {e}") from None
    finally:
        barrier()
        cleanup()
    if not ctx.is_main:
        return {}
    metrics = _finish(cfg, ctx, enc, res, scans, staging, out)
    print(f"localmim segment: mIoU {metrics['mIoU']:.2f}, mAcc {metrics['mAcc']:.2f}, aAcc {metrics['aAcc']:.2f} "
          f"after {res.metrics['iters']} iterations -> {out}", file=sys.stderr)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _finish(cfg, ctx: StageContext, enc, res, scans, staging: Path, out: Path) -> dict:
    """Model, grid, per-class table and params into ``staging``, renamed to ``out``; the metrics file."""
    from localmim.train.segment import inference_mode
    from localmim.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text

    m = res.metrics
    atomic_torch_save({k: v.detach().cpu() for k, v in res.model.state_dict().items()}, staging / "model.pt")
    atomic_write_json(staging / "model.json", {
        "encoder": {"timm_name": enc.timm_name, "timm_kwargs": enc.timm_kwargs}, "num_classes": cfg.num_classes,
        "crop_size": cfg.crop_size, "channels": cfg.channels, "aux_channels": cfg.aux_channels,
        "label_convention": "ADE20K: prediction k (0-based) is written as k + 1; 0 = ignore",
        "build": "localmim.models.segmentation.build_segmenter(read_encoder(...), num_classes, crop_size=..., "
                 "channels=..., aux_channels=...)"})
    val = scans["val"].pairs
    rows = [(p.image, p.annotation, staging / "pred" / p.annotation.name) for p in val[:cfg.num_vis]]
    if rows:
        write_grid(staging / "grid.png", rows)
    lines = ["class,ade_label,iou,acc"] + [
        f"{k},{k + 1},{'' if math.isnan(i) else f'{i:.4f}'},{'' if math.isnan(a) else f'{a:.4f}'}"
        for k, (i, a) in enumerate(zip(m["per_class_iou"], m["per_class_acc"], strict=True))]
    atomic_write_text(staging / "per_class.csv", "\n".join(lines) + "\n")
    ctx.dump_params(cfg, staging)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.replace(old)
    staging.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    metrics = {"mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"], "iters": m["iters"],
               "val_images": m["images"], "train_seconds": m["train_seconds"],
               "images_per_s": m.get("final_images_per_s", float("nan")), "world_size": m["world_size"],
               "inference": inference_mode(cfg, res.model)}
    for s, sc in scans.items():
        metrics.update({f"{s}_found": sc.found, f"{s}_used": len(sc.pairs), f"{s}_skipped": len(sc.skipped)})
    metrics.update(per_class_iou=_nan_to_none(m["per_class_iou"]), per_class_acc=_nan_to_none(m["per_class_acc"]),
                   history=res.history, skipped={s: sc.skipped for s, sc in scans.items()})
    atomic_write_json(ctx.args.metrics, metrics)
    for name in ("grid.png", "per_class.csv", "model.json"):
        ctx.tracker.log_artifact(out / name)
    return metrics

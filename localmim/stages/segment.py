"""``localmim segment --encoder data/pretrain --data data/raw/ade20k --out data/segment``: ADE20K semantic
segmentation with UperNet on the exported encoder (method §9.1).

Both splits are validated before training (``segment.on_bad``: skip with reasons | fail), every image and label map
fully decoded (cached in ``CKPT_DIR/image-check.json`` by path, size and mtime: a rerun or resume decodes only new or
changed files). A file that fails to load during the run (damaged after the check) is skipped with a record in
``CKPT_DIR/load-skips-*.jsonl`` (``skip``) or stops the run with one line naming it (``fail``). Outputs (rank 0,
the whole directory appears at once: built under ``.<out>.staging`` and renamed):

- ``OUT/model.pt`` + ``OUT/model.json``: the saved segmenter (:mod:`localmim.models.artifact`, ``load_model(OUT)``);
- ``OUT/pred/<annotation name>.png``: one label map per val image in ADE20K's convention (class k -> k + 1,
  0 never predicted), at the annotation's size, so any ADE20K scorer can re-score them;
- ``OUT/grid.png``: image | ground truth | prediction for the first ``num_vis`` val images (torchvision's palette);
- ``OUT/per_class.csv`` and ``OUT/params.yaml``;
- ``metrics/segment.json``: mIoU, mAcc, aAcc (percent), per-class IoU/Acc (null: class left out), the mIoU of two
  predictors that never look at the image on the same val pixels (``mIoU_majority``: the most frequent class
  everywhere; ``mIoU_chance``: a uniformly random class per pixel), the split
  counts (found = used + skipped, load-time skips included) with every skipped file and its reason, notes on
  usable files worth naming (a PNG under a ``.jpg`` name), throughput.

MLflow: params, per-iteration loss/lr, eval metrics with their step, the grid and the per-class table.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from localmim.config.segment import SegmentConfig
from localmim.pipeline import paths
from localmim.pipeline.stage import StageContext, StageError, flag, shared_flags, stage


def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    import io

    from PIL import Image

    from localmim.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_grid(path: Path, rows: list[tuple[Path, Path, Path]], num_labels: int) -> None:
    """One row per (image, annotation, prediction) file: image | ground truth | prediction
    (:func:`localmim.eval.segmentation.render`; ADE20K label values, 0 black); rows whose files do not decode (a val
    file that failed to load: skipped and reported) are left out."""
    import torch
    from torchvision.io import encode_png

    from localmim.data.raw.imagefile import ImageFileError, read_image
    from localmim.eval.segmentation import render
    from localmim.utils.io import atomic_write_bytes

    tensors = []
    for img_p, ann_p, pred_p in rows:
        try:
            arrs = (np.asarray(read_image(img_p)).transpose(2, 0, 1), np.asarray(read_image(ann_p, None)),
                    np.asarray(read_image(pred_p, None)))
        except ImageFileError:
            continue
        tensors.append(tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrs))
    if tensors:
        atomic_write_bytes(path, bytes(encode_png(render(tensors, num_labels)).numpy()))


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 4) for v in values]


@stage(
    "segment",
    section="segment",
    config=SegmentConfig,
    help="ADE20K semantic segmentation: UperNet on the exported encoder (mIoU, label-map PNGs)",
    flags=[
        *shared_flags("segment", "encoder"),
        flag("--data", default=paths.raw("ade20k"), help="ADE20K release folder, or its dataset manifest "
                                                        "(data/raw/ade20k.json) (default: %(default)s)"),
        *shared_flags("segment", "out", "ckpt-dir", "metrics", "iters", "device", "no-progress"),
    ],
    system_metrics=True,
)
def run(cfg: SegmentConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.models.encoder_io import read_encoder
    from localmim.runtime.distributed import process_group

    enc = read_encoder(ctx.args.encoder)
    out = Path(ctx.args.out)
    with process_group(cfg.device) as dist:
        scans = _scans(cfg, ctx)
        res = _train(cfg, ctx, enc, scans, out, dist)
    if not ctx.is_main:
        return {}
    metrics = _finish(cfg, ctx, enc, res, scans, out)
    print(f"localmim segment: mIoU {metrics['mIoU']:.2f}, mAcc {metrics['mAcc']:.2f}, aAcc {metrics['aAcc']:.2f} "
          f"after {res.metrics['iters']} iterations -> {out}", file=sys.stderr)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _scans(cfg: SegmentConfig, ctx: StageContext) -> dict:
    """Both splits, checked once on rank 0 (:func:`_scan`) and shared with the other ranks."""
    from localmim.runtime.distributed import broadcast_object

    scans = broadcast_object(_scan(cfg, ctx.args) if ctx.is_main else {})
    if isinstance(scans, str):
        raise StageError(scans)
    for s, sc in scans.items():
        if (sc.skipped or sc.notes) and ctx.is_main:
            print(f"localmim segment: {s}: skipped {len(sc.skipped)} of {sc.found}, {len(sc.notes)} note(s) "
                  "(see the metrics file)", file=sys.stderr)
    return scans


def _train(cfg: SegmentConfig, ctx: StageContext, enc, scans: dict, out: Path, dist):
    """Train and evaluate; every val prediction is written into ``out``'s staging directory as it comes."""
    from localmim.runtime.distributed import barrier
    from localmim.train.segment import run_segment
    from localmim.utils.io import staging_dir, staging_path

    val_pairs = scans["val"].pairs
    staging = staging_path(out)  # every rank writes its share of the predictions there
    if ctx.is_main:
        (staging_dir(out) / "pred").mkdir()
    barrier()

    def on_pred(idx: int, pred) -> None:  # ADE20K convention: class k -> k + 1 (0 = ignore, never predicted)
        if idx < 0:  # a val pair that failed to load: scored as absent, no file
            return
        _png(staging / "pred" / val_pairs[idx].annotation.name, (pred + 1).to("cpu").numpy().astype(np.uint8))

    res = run_segment(cfg, enc, scans["train"].pairs, val_pairs, ctx.args.ckpt_dir, on_pred=on_pred,
                      log_fn=lambda m, step: ctx.tracker.log_metrics(m, step=step),
                      progress=not ctx.args.no_progress, dist=dist)
    barrier()
    return res


def _scan(cfg: SegmentConfig, args) -> dict | str:
    """Both splits checked (cached in the checkpoint directory), each with its load-time rule; or the error."""
    from localmim.data.dense.ade20k import scan_split
    from localmim.data.raw.datasets import dataset_root
    from localmim.data.raw.imagefile import LoadSkips, file_stats, load_skip_log

    cache = Path(args.ckpt_dir) / "image-check.json"
    try:
        data = dataset_root(args.data)  # a manifest names the folder
        scans = {s: scan_split(data, s, cfg.num_classes, cfg.on_bad, cache=cache, progress=not args.no_progress)
                 for s in ("train", "val")}
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    files = [f for sc in scans.values() for p in sc.pairs for f in (p.image, p.annotation)]
    log = load_skip_log(args.ckpt_dir, {"run": cfg.run_key(), "files": file_stats(files)})
    for s, sc in scans.items():
        sc.pairs.skips = LoadSkips(log, cfg.on_bad, s)
    return scans


def _split_counts(scans, val_images: int) -> dict:
    """found / used / skipped per split, the skipped files with their reasons (load-time ones too) and notes."""
    out: dict = {"skipped": {}, "notes": {}}
    for s, sc in scans.items():
        failed = {r["file"]: r["reason"] for r in sc.pairs.skips.records()}
        at_load = [{"file": f, "reason": failed[f]} for p in sc.pairs
                   for f in [next((str(x) for x in (p.image, p.annotation) if str(x) in failed), None)] if f]
        used = len(sc.pairs) - len(at_load)
        out.update({f"{s}_found": sc.found, f"{s}_used": used, f"{s}_skipped": len(sc.skipped) + len(at_load)})
        out["skipped"][s] = sc.skipped + at_load
        out["notes"][s] = sc.notes
    if out["val_used"] != val_images:
        print(f"localmim segment: warning: {out['val_used']} val pairs used, {val_images} scored", file=sys.stderr)
    return out


def _finish(cfg, ctx: StageContext, enc, res, scans, out: Path) -> dict:
    """Model, grid, per-class table and params into the staging directory, swapped in for ``out``; the metrics
    file."""
    import torch

    from localmim.eval.segmentation import baseline_scores
    from localmim.models.artifact import save_model
    from localmim.models.segmentation import SegmenterSpec
    from localmim.train.segment import inference_mode
    from localmim.utils.io import atomic_write_text, replace_dir, staging_path

    m, staging = res.metrics, staging_path(out)
    save_model(staging, res.model, SegmenterSpec.from_config(cfg), encoder=enc,
               info={"label_convention": "ADE20K: prediction k (0-based) is written as k + 1; 0 = ignore",
                     "inference": inference_mode(cfg, res.model)})
    val = scans["val"].pairs
    rows = [(p.image, p.annotation, staging / "pred" / p.annotation.name) for p in val[:cfg.num_vis]]
    if rows:
        write_grid(staging / "grid.png", rows, cfg.num_classes + 1)
    lines = ["class,ade_label,iou,acc"] + [
        f"{k},{k + 1},{'' if math.isnan(i) else f'{i:.4f}'},{'' if math.isnan(a) else f'{a:.4f}'}"
        for k, (i, a) in enumerate(zip(m["per_class_iou"], m["per_class_acc"], strict=True))]
    atomic_write_text(staging / "per_class.csv", "\n".join(lines) + "\n")
    ctx.dump_params(cfg, staging)
    replace_dir(staging, out)  # the old output kept until the new one is complete
    val_images = len(list((out / "pred").glob("*.png")))  # scored in the final pass (placeholders write none)
    metrics = {"mIoU": m["mIoU"], **baseline_scores(torch.tensor(m["confusion"])), "mAcc": m["mAcc"],
               "aAcc": m["aAcc"], "iters": m["iters"],
               "val_images": val_images, "train_seconds": m["train_seconds"],
               "images_per_s": m.get("final_images_per_s", float("nan")), "world_size": m["world_size"],
               "inference": inference_mode(cfg, res.model)}
    history = [{k: r[k] for k in ("step", "mIoU", "mAcc", "aAcc")} for r in res.history]
    counts = _split_counts(scans, val_images)
    metrics.update({k: v for k, v in counts.items() if k not in ("skipped", "notes")})
    metrics.update(per_class_iou=_nan_to_none(m["per_class_iou"]), per_class_acc=_nan_to_none(m["per_class_acc"]),
                   history=history, skipped=counts["skipped"], notes=counts["notes"])
    ctx.write_metrics(ctx.args.metrics, metrics)
    for name in ("grid.png", "per_class.csv", "model.json"):
        ctx.tracker.log_artifact(out / name)
    return metrics

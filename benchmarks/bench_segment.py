"""The segment stage on the embedded mini ADE20K: pretrained encoder vs the same encoder randomly initialised vs
the trivial most-frequent-class prediction, same recipe (params.yaml ``segment``) and seeds; CPU throughput.

Uses ``data/raw/ade20k`` and ``data/pretrain`` when ``make demo`` built them, else runs ``localmim synth``,
``localmim shard`` and ``localmim pretrain`` (the params.yaml recipes) into the work directory. Prints a markdown
section; ``--json FILE`` writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


def ensure_inputs(work: Path) -> tuple[Path, Path]:
    """(ADE20K folder, exported encoder folder): the demo's outputs, or fresh ones under ``work``."""
    for root in (ROOT / "data", work):  # the demo's outputs, or a previous run's
        ade, enc = root / "raw" / "ade20k", root / "pretrain"
        if (enc / "encoder.json").is_file() and ade.is_dir():
            return ade, enc
    env = dict(os.environ, LOCALMIM_TRACKING="0")
    params = str(ROOT / "params.yaml")
    cmds = [["synth", str(work / "raw")],
            ["shard", str(work / "raw" / "imagenet" / "train"), str(work / "shards"), "--split", "train"],
            ["pretrain", "--shards", str(work / "shards"), "--out", str(work / "pretrain"), "--ckpt-dir",
             str(work / "ck_pretrain"), "--metrics", str(work / "pretrain.json"), "--no-progress"]]
    for c in cmds:
        print(f"$ localmim {' '.join(c)}", file=sys.stderr, flush=True)
        subprocess.run([str(BIN / "localmim"), *c, "--params", params], check=True, env=env, cwd=work,
                       stdout=subprocess.DEVNULL)
    return work / "raw" / "ade20k", work / "pretrain"


def most_frequent_class(cfg, train, val) -> dict:
    """Predict the most frequent training class everywhere; scored like the model."""
    import torch

    from localmim.data.dense.ade20k import reduce_zero_label
    from localmim.data.raw.imagefile import read_image
    from localmim.eval.segmentation import confusion_matrix, scores

    counts = np.zeros(256, np.int64)
    for p in train:
        counts += np.bincount(reduce_zero_label(np.asarray(read_image(p.annotation, None))).ravel(), minlength=256)
    top = int(np.argmax(counts[:cfg.num_classes]))
    cm = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.int64)
    for p in val:
        gt = torch.from_numpy(reduce_zero_label(np.asarray(read_image(p.annotation, None))))
        cm += confusion_matrix(torch.full_like(gt, top), gt, cfg.num_classes)
    return {**scores(cm), "class": top}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from localmim.config import load_section
    from localmim.config.segment import SegmentConfig
    from localmim.data.dense.ade20k import scan_split
    from localmim.models.encoder_io import read_encoder
    from localmim.train.segment import run_segment

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_segment_"))
    work.mkdir(parents=True, exist_ok=True)
    ade, enc_dir = ensure_inputs(work)
    base = load_section("segment", SegmentConfig, ROOT / "params.yaml", ["segment.device=cpu"])
    train, val = (scan_split(ade, s, base.num_classes).pairs for s in ("train", "val"))
    enc = read_encoder(enc_dir)
    rows = []
    for pretrained in (True, False):
        for seed in args.seeds:
            cfg = base.model_copy(update={"pretrained": pretrained, "seed": seed})
            t0 = time.perf_counter()
            r = run_segment(cfg, enc, train, val, work / f"ck_{pretrained}_{seed}", progress=False)
            rows.append({"encoder": "pretrained" if pretrained else "random init", "seed": seed,
                         "mIoU": r.metrics["mIoU"], "mAcc": r.metrics["mAcc"], "aAcc": r.metrics["aAcc"],
                         "images_per_s": r.metrics.get("final_images_per_s", float("nan")),
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], file=sys.stderr, flush=True)
    trivial = most_frequent_class(base, train, val)
    rows.append({"encoder": f"most frequent class ({trivial['class']})", "seed": "-", "mIoU": trivial["mIoU"],
                 "mAcc": trivial["mAcc"], "aAcc": trivial["aAcc"], "images_per_s": float("nan"), "seconds": 0.0})
    info = json.loads((enc_dir / "encoder.json").read_text())
    patch = info["timm_kwargs"].get("patch_size", "?")
    print(f"UperNet on the `{info['timm_name']}` (patch {patch}) encoder of the params.yaml pretrain recipe, the "
          f"params.yaml `segment` recipe ({base.iters} iterations, global batch {base.global_batch}, crop "
          f"{base.crop_size}, lr {base.lr}, layer decay {base.layer_decay}, {base.num_classes} classes), {len(train)} "
          f"train / {len(val)} val images, CPU "
          f"(fp32, {torch.get_num_threads()} threads). mIoU/mAcc/aAcc in % on val; images/s = training throughput.\n")
    print("| encoder | seed | mIoU | mAcc | aAcc | train images/s | seconds |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['seed']} | {r['mIoU']:.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} | "
              f"{r['images_per_s']:.1f} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

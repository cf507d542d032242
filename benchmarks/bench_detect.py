"""COCO detection on the embedded data: the pretrained LocalMIM encoder vs the same encoder randomly initialised.

Runs the real CLI in a temp directory with the repository's ``params.yaml`` (embedded defaults): ``synth`` ->
``shard`` (train) -> ``pretrain`` -> ``detect`` twice, with ``detect.pretrained`` true and false (same recipe,
same seed). Prints a markdown section (box / mask AP and training images/s of the stage) and writes the raw
numbers with ``--json``. A measurement, not a test: a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEYS = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")


def _cli(work: Path, *args: str) -> float:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    env.setdefault("OMP_NUM_THREADS", "2")
    t = time.perf_counter()
    p = subprocess.run([str(BIN / "localmim"), *args], cwd=work, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"localmim {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def run(work: Path, detect_sets: list[str], reuse: bool = False, data: str = "data/raw/coco") -> dict:
    pre_s = None
    if not (reuse and (work / "data" / "pretrain" / "encoder.pt").is_file()):
        shutil.copy(ROOT / "params.yaml", work / "params.yaml")
        _cli(work, "synth", "data/raw")
        _cli(work, "shard", "data/raw/imagenet/train", "data/shards/train", "--split", "train")
        pre_s = _cli(work, "pretrain", "--out", "data/pretrain", "--ckpt-dir", "data/ck/pretrain",
                     "--metrics", "metrics/pretrain.json")
    ann = {s: json.loads((work / data / "annotations" / f"instances_{s}2017.json").read_text())
           for s in ("train", "val")}
    out = {"pretrain_seconds": pre_s, "detect_overrides": detect_sets, "data": data, "runs": {},
           "images": {s: len(a["images"]) for s, a in ann.items()}, "classes": len(ann["train"]["categories"])}
    for pretrained in (True, False):
        name = "pretrained" if pretrained else "random_init"
        sets = [a for s in [f"detect.pretrained={str(pretrained).lower()}", *detect_sets] for a in ("--set", s)]
        wall = _cli(work, "detect", "--encoder", "data/pretrain", "--data", data, "--out", f"data/{name}",
                    "--ckpt-dir", f"data/ck/{name}", "--metrics", f"metrics/{name}.json", *sets)
        m = json.loads((work / "metrics" / f"{name}.json").read_text())
        m |= json.loads((work / "metrics" / f"{name}.timing.json").read_text())  # times and rates
        dets = json.loads((work / "data" / name / "detections_val.json").read_text())
        out["runs"][name] = m | {"stage_wall_seconds": wall, "detections": len(dets),
                                 "max_score": max((d["score"] for d in dets), default=0.0)}
    return out


def markdown(res: dict) -> str:
    head = "| encoder | " + " | ".join(KEYS) + " | detections (max score) | train images/s | stage wall s |"
    rows = [head, "|---" * (len(KEYS) + 4) + "|"]
    for name, m in res["runs"].items():
        vals = " | ".join(f"{100 * m[k]:.2f}" for k in KEYS)
        rows.append(f"| {name} | {vals} | {m['detections']} ({m['max_score']:.2f}) | {m['train_images_per_s']:.2f} "
                    f"| {m['stage_wall_seconds']:.0f} |")
    any_run = next(iter(res["runs"].values()))
    if all(f"{k}_prior" in any_run for k in KEYS):  # the training boxes guessed on every val image (method §17)
        rows.append("| prior (no image) | " + " | ".join(f"{100 * any_run[f'{k}_prior']:.2f}" for k in KEYS)
                    + " | - | - | - |")
    extra = ", ".join(res["detect_overrides"]) or "none"
    n = res.get("images", {"train": 40, "val": 16})
    return "\n".join([
        f"Embedded-layout data (`{res.get('data', 'data/raw/coco')}`: {n['train']} train / {n['val']} val images, "
        f"{res.get('classes', 10)} shape classes), `params.yaml` defaults: the encoder from `localmim pretrain` "
        "(embedded default) vs the same architecture randomly initialised, same detect recipe and seed "
        f"(overrides: {extra}; {any_run['epochs']:.0f} epochs). AP in percent (COCOeval x100).",
        "",
        *rows,
        "",
        (f"Pretraining the encoder took {res['pretrain_seconds']:.0f} s. " if res["pretrain_seconds"] else "")
        + "Train images/s is the stage's training loop (data loading included, evaluation excluded) on CPU.",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra detect overrides, e.g. detect.epochs=6 (repeatable)")
    ap.add_argument("--work", help="keep the run here instead of a temp directory")
    ap.add_argument("--reuse", action="store_true", help="with --work: reuse its data/pretrain (skip synth/pretrain)")
    ap.add_argument("--data", default="data/raw/coco", help="COCO-layout folder, relative to the work directory")
    args = ap.parse_args()
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        res = run(work, args.sets, args.reuse, args.data)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_detect_") as d:
            res = run(Path(d), args.sets)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

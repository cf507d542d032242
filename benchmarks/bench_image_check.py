"""Cost of the full-decode image check of ``segment`` / ``detect`` (issue 21), per 10k images, and its projection
for ADE20K and COCO.

Images: ``--images`` COCO/ADE20K-like JPEGs (640x480, 480x640 or 683x512; random crops, rescales, flips and
brightness of the three real photographs shipped with matplotlib and scikit-learn, plus sensor-like noise and
quality 95 so that the mean file is near COCO's ~160 KB: Huffman decoding, most of the check, scales with the
bytes) and as many ADE20K-like label maps (8-bit PNG, 30 Voronoi regions). Timed, in one process, rounds alternated:

* ``check`` - :func:`localmim.data.raw.imagefile.check_image_files` with 2 worker processes and no cache (the first
  run of a stage), images and label maps separately;
* ``cached`` - the same call with the cache filled (a rerun or a resume: a ``stat`` per file, no decode);
* the scans it replaces, for scale: ``Image.verify()`` + header (ADE20K before) and header only (COCO before);
  and a full-resolution decode to RGB (what the check would cost without the JPEG draft mode).

CPU = user + system time of this process and its (joined) workers, from ``getrusage``: on a shared machine that
is the robust number; wall on 2 free cores is about CPU / 2. Files are read from the page cache (just written):
disk reads on a cold cache come on top and are not CPU. Prints a markdown section; ``--json FILE`` writes the
raw numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(640, 480), (480, 640), (683, 512)]
COCO_TRAIN, COCO_VAL, ADE_TRAIN, ADE_VAL = 118_287, 5_000, 20_210, 2_000


def _photos() -> list[Image.Image]:
    import matplotlib
    import sklearn

    paths = [Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg",
             Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
             Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
    return [Image.open(p).convert("RGB") for p in paths if p.is_file()]


def make_images(out: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    photos = _photos()
    files = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        src = photos[i % len(photos)]
        s = max(w / src.width, h / src.height) * rng.uniform(1.0, 1.8)
        im = src.resize((int(src.width * s) + 1, int(src.height * s) + 1), Image.BILINEAR)
        x, y = rng.integers(0, im.width - w + 1), rng.integers(0, im.height - h + 1)
        im = im.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, 6.0, (h, w, 3))
        p = out / f"img_{i:06d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p, quality=95)
        files.append(p)
    return files


def make_labels(out: Path, n: int, seed: int = 1) -> list[Path]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:342].astype(np.float32)  # regions drawn at half size, then upsampled
    files = []
    for i in range(n):
        pts = rng.uniform((0, 0), (256, 342), (30, 2)).astype(np.float32)
        d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2  # [H/2, W/2, 30]
        lab = rng.integers(0, 151, 30).astype(np.uint8)[d.argmin(-1)]
        p = out / f"ann_{i:06d}.png"
        Image.fromarray(lab, "L").resize((683, 512), Image.NEAREST).save(p)
        files.append(p)
    return files


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return cpu_seconds() - c0, time.perf_counter() - t0


def verify_header(files):
    for f in files:
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            _ = im.size


def header_only(files):
    for f in files:
        with Image.open(f) as im:
            _ = im.size


def full_decode(files):
    for f in files:
        with Image.open(f) as im:
            im.convert("RGB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from localmim.data.raw.imagefile import check_image_files

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        imgs, anns = make_images(tmp, args.images), make_labels(tmp, args.images)
        gen_s = time.perf_counter() - t0
        img_kb = statistics.mean(f.stat().st_size for f in imgs) / 1024
        ann_kb = statistics.mean(f.stat().st_size for f in anns) / 1024
        runs: dict[str, list[tuple[float, float]]] = {}

        def check(files, kind, cache=None):
            return lambda: check_image_files([(f, kind) for f in files], cache=cache, workers=args.workers)

        cache = tmp / "cache.json"
        check(imgs, "image", cache)()  # fills the cache (not timed)
        cases = {"check images": check(imgs, "image"), "check label maps": check(anns, "label"),
                 "cached rerun (images)": check(imgs, "image", cache), "verify + header (ADE20K before)":
                 lambda: verify_header(imgs), "header only (COCO before)": lambda: header_only(imgs),
                 "full decode to RGB, 1 process": lambda: full_decode(imgs)}
        for r in range(args.rounds):
            for name, fn in (cases.items() if r % 2 == 0 else reversed(cases.items())):
                runs.setdefault(name, []).append(timed(fn))
                print(f"round {r} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    n = args.images
    per10k = {k: statistics.median(c for c, _ in v) / n * 10_000 for k, v in runs.items()}
    wall10k = {k: statistics.median(w for _, w in v) / n * 10_000 for k, v in runs.items()}
    coco = (COCO_TRAIN + COCO_VAL) / 10_000 * per10k["check images"]
    ade = (ADE_TRAIN + ADE_VAL) / 10_000 * (per10k["check images"] + per10k["check label maps"])
    print(f"{n} JPEGs ({img_kb:.0f} KB mean, 640x480 / 480x640 / 683x512, q95, from real photographs) and {n} "
          f"label-map PNGs ({ann_kb:.0f} KB mean, 683x512), generated in {gen_s:.0f}s; {args.workers} worker "
          f"processes; median of {args.rounds} alternated rounds. CPU = user + system of this process and its "
          "workers (getrusage); files in the page cache.\n")
    print("| what | CPU s / 10k files | wall s / 10k files |\n|---|---:|---:|")
    for k in runs:
        print(f"| {k} | {per10k[k]:.1f} | {wall10k[k]:.1f} |")
    print(f"\nProjection (CPU): COCO train + val ({COCO_TRAIN + COCO_VAL:,} images) {coco:.0f} s CPU, about "
          f"{coco / 2 / 60:.1f} min on 2 free cores; ADE20K train + val ({ADE_TRAIN + ADE_VAL:,} images and as many "
          f"label maps) {ade:.0f} s CPU, about {ade / 2 / 60:.1f} min on 2 free cores. A rerun or resume with the "
          f"cache: {(COCO_TRAIN + COCO_VAL) / 10_000 * per10k['cached rerun (images)']:.1f} s CPU for COCO.")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": n, "image_kb": img_kb, "label_kb": ann_kb, "runs": runs,
                                               "cpu_s_per_10k": per10k, "wall_s_per_10k": wall10k,
                                               "coco_cpu_s": coco, "ade20k_cpu_s": ade}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

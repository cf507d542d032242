"""Benchmark of the raw-dataset manifest (``localmim dataset``): seconds per million files, stat and content modes.

Builds an ImageNet-shaped tree of small files in a temp dir (``--classes`` class folders of ``--per-class`` train
files, a flat val folder of 1/25 as many, ``LOC_val_solution.csv``), then times ``write_manifest``: the listing alone
(threaded ``os.scandir`` + ``stat``), the whole stat-mode manifest (listing, sorting, fingerprint, gzip'd file list),
and content mode (first pass, then with every hash cached). Wall and process CPU time, scaled to one million files
(the work is linear in the file count). The file metadata is in the page cache (the tree was just written): a cold
cache or a network file system adds its stat latency, which the 16 scan threads overlap.

Usage: ``python benchmarks/bench_manifest.py [--json OUT] [--classes 800] [--per-class 250] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from localmim.data.raw.datasets import list_tree, write_manifest


def make_tree(root: Path, classes: int, per_class: int) -> int:
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"n{c:08d}_{i}.JPEG").write_bytes(b"x" * (i % 7))
    (root / "val").mkdir()
    for i in range(classes * per_class // 25):
        (root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(b"y")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    return classes * per_class + classes * per_class // 25 + 1


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--classes", type=int, default=800)
    ap.add_argument("--per-class", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "imagenet", Path(tmp) / "raw"
        t_make, _ = timed(lambda: make_tree(root, args.classes, args.per_class))
        n = sum(len(f) for _, _, f in os.walk(root))
        runs = {
            "listing (scandir + stat)": [timed(lambda: list_tree(root, "train")) for _ in range(args.repeats)],
            "stat manifest": [timed(lambda: write_manifest("imagenet", str(root), out)) for _ in range(args.repeats)],
            "content manifest, first": [timed(lambda: write_manifest("imagenet", str(root), out, mode="content"))],
            "content manifest, cached": [timed(lambda: write_manifest("imagenet", str(root), out, mode="content"))
                                         for _ in range(args.repeats)],
        }  # fmt: skip
        tsv_bytes = (out / "imagenet.files.tsv.gz").stat().st_size
    n_list = args.classes * args.per_class
    rows = {}
    for what, times in runs.items():
        files = n_list if what.startswith("listing") else n
        wall = statistics.median(t[0] for t in times) / files * 1e6
        cpu = statistics.median(t[1] for t in times) / files * 1e6
        rows[what] = {"files": files, "wall_s_per_million": wall, "cpu_s_per_million": cpu, "repeats": len(times)}
    load = os.getloadavg()[0]
    print(f"{n:,} files ({args.classes} class folders of {args.per_class}, a flat val folder, a CSV; written in "
          f"{t_make:.0f}s), metadata cached, 1-min load {load:.1f} on {os.cpu_count()} cores. Medians, scaled to "
          f"one million files (linear in the count).\n")
    print("| what | files | wall s / million | CPU s / million |")
    print("|---|---:|---:|---:|")
    for what, r in rows.items():
        print(f"| {what} | {r['files']:,} | {r['wall_s_per_million']:.1f} | {r['cpu_s_per_million']:.1f} |")
    print(f"\nFile list (`imagenet.files.tsv.gz`): {tsv_bytes / n * 1e6 / 2**20:.1f} MiB per million files. Content "
          f"mode reads every byte on its first pass (here the files are nearly empty: this is its per-file cost).")
    if args.json:
        Path(args.json).write_text(json.dumps({"files": n, "load": load, "rows": rows, "tsv_bytes": tsv_bytes},
                                              indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

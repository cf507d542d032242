"""The shard reader of this tree against the one of a reference commit, in one process (prints markdown).

Issue 8 replaced the benchmark-only reader of commit b180301 (``localmim.data.shards.write.wds_pipeline``: webdataset
``SimpleShardList -> split_by_worker -> mmap tar parse -> map``) by the one reader every stage uses, and asked that
read throughput not drop. Separate ``bench_shards.py`` runs differ by a few percent from run to run, as much as
the readers do, so this one imports both readers into one process (the reference commit's package extracted with
``git archive`` and renamed ``localmim_ref``) and alternates their epochs, with torchvision ImageFolder and the
in-memory decode ceiling, on the same shards, images and transforms as ``bench_shards.py``. Sharding is compared
the same way: both commits' ``write_shards`` (2 worker processes) alternated on the same ImageFolder tree, with a
check that they write byte-identical shards.

Reported per reader: the median CPU time per image over main process + DataLoader workers, and paired ratios
(median over rounds of the within-round ratio; > 1: this tree's reader is cheaper).
Not part of ``make bench`` (it needs the git history): run ``.venv/bin/python benchmarks/bench_reader_vs_ref.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def extract_ref(commit: str, dest: Path) -> None:
    """``localmim/`` of ``commit`` as package ``localmim_ref`` under ``dest`` (imports rewritten)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "localmim"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)
    (dest / "localmim").rename(dest / "localmim_ref")
    for p in (dest / "localmim_ref").rglob("*.py"):
        p.write_text(re.sub(r"\blocalmim(?=[. ])", "localmim_ref", p.read_text()))
    sys.path.insert(0, str(dest))


def loaders(src: Path, shard_dir: Path, size: int, workers: int, batch: int) -> tuple[dict, int]:
    """The four readers as per-epoch loader factories, and the number of images."""
    import torchvision.transforms as T
    from bench_shards import InMemory
    from localmim_ref.data.shards import shard_paths, wds_pipeline
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from localmim.data.classify import ClassifyShards, make_loader
    from localmim.data.raw.imagefile import read_image  # the one reader of image files (issue 21)
    from localmim.data.shards.manifest import shard_set
    from localmim.data.shards.stream import raw_samples

    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    items = [(s["jpg"], int(s["cls"])) for s in raw_samples(shard_set(shard_dir, "train"))]
    urls = shard_paths(shard_dir, "train")
    kw = dict(batch_size=batch, num_workers=workers)
    return {  # built per epoch, as training does
        "this tree (`ClassifyShards`)": lambda: make_loader(ClassifyShards(shard_dir, tf, batch_size=batch,
                                                                           train=False), workers),  # fmt: skip
        "reference (`wds_pipeline`)": lambda: DataLoader(wds_pipeline(urls, tf), **kw),
        "torchvision ImageFolder": lambda: DataLoader(ImageFolder(str(src), tf, loader=read_image), shuffle=False,
                                                      **kw),
        "same bytes in memory (ceiling)": lambda: DataLoader(InMemory(items, tf), shuffle=False, **kw),
    }, len(items)


def bench_sharding(src: Path, tmp: Path, n: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Both commits' ``write_shards`` alternated ABBA: images/s and CPU us per image (process + reaped workers)
    per round; AssertionError if their shards differ."""
    import shutil
    import time

    from bench_shards import _cpu
    from localmim_ref.data import shards as ref

    from localmim.data.shards import write as cur

    writers = {"this tree": cur, "reference": ref}
    out: dict[str, dict[str, list[float]]] = {k: {"img_s": [], "cpu_us": []} for k in writers}
    digests = {}
    for r in range(rounds + 1):  # round 0: warm-up
        for name in list(writers) if r % 2 == 0 else list(writers)[::-1]:
            mod, dest = writers[name], tmp / f"shard-{name}"
            shutil.rmtree(dest, ignore_errors=True)
            c, t = _cpu(), time.perf_counter()
            man = mod.write_shards(src, dest, "train", mod.ShardOptions(max_samples_per_shard=-(-n // 8), workers=2),
                                   progress=False)  # fmt: skip
            dt, cpu = time.perf_counter() - t, _cpu() - c
            digests[name] = [s["sha256"] for s in man["shards"]]
            if r:
                out[name]["img_s"].append(n / dt)
                out[name]["cpu_us"].append(cpu / n * 1e6)
        assert digests["this tree"] == digests["reference"], "the two writers wrote different shards"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="b180301", help="reference commit (its reader: data.shards.wds_pipeline)")
    ap.add_argument("--per-class", type=int, default=120, help="images per class, 10 classes")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--shard-rounds", type=int, default=6, help="sharding rounds per writer (0 = skip)")
    ap.add_argument("--json", help="write the per-round numbers here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from bench_shards import _epoch, make_images

    from localmim.data.shards.write import ShardOptions, write_shards

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extract_ref(args.ref, tmp)
        n = make_images(tmp / "imagenet", 10, args.per_class, 96, 320)
        write_shards(tmp / "imagenet" / "train", tmp / "shards", "train",
                     ShardOptions(max_samples_per_shard=-(-n // 8), workers=2), progress=False)  # fmt: skip
        makers, n = loaders(tmp / "imagenet" / "train", tmp / "shards", 64, 2, 64)
        load = [os.getloadavg()[0]]
        for make in makers.values():
            _epoch(make(), n)  # warm-up: page cache, imports
        cpu: dict[str, list[float]] = {k: [] for k in makers}
        for r in range(args.rounds):  # ABBA order: a drifting load hits every reader alike
            for name in list(makers) if r % 2 == 0 else list(makers)[::-1]:
                cpu[name].append(_epoch(makers[name](), n)[1])
        shard = bench_sharding(tmp / "imagenet" / "train", tmp, n, args.shard_rounds) if args.shard_rounds else {}
        load.append(os.getloadavg()[0])
    ours = np.array(cpu["this tree (`ClassifyShards`)"])
    print(f"{n} images, {args.rounds} rounds per reader (ABBA), DataLoader(batch 64, 2 workers), decode + "
          f"RandomResizedCrop(64) + flip + ToTensor; reference = commit {args.ref}; 1-min load "
          f"{load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores.\n")
    print("| reader | CPU us/img (median) | its CPU / this tree's (paired median) |\n|---|---:|---:|")
    for name, c in cpu.items():
        print(f"| {name} | {np.median(c):.0f} | {np.median(np.array(c) / ours):.3f} |")
    if shard:
        print("\n| writer (`write_shards`, 2 procs, byte-identical shards) | images/s (median) | CPU us/img (median) "
              "| its CPU / this tree's (paired median) |\n|---|---:|---:|---:|")
        mine = np.array(shard["this tree"]["cpu_us"])
        for name, r in shard.items():
            print(f"| {name} | {np.median(r['img_s']):.0f} | {np.median(r['cpu_us']):.0f} | "
                  f"{np.median(np.array(r['cpu_us']) / mine):.3f} |")
    if args.json:
        raw = {"args": vars(args), "images": n, "load_1min": load, "cpu_us_per_image": cpu, "sharding": shard}
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

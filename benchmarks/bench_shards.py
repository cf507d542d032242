"""Sharding and shard-reading throughput on the synthetic ImageNet layout (``make bench``; prints markdown).

1. Sharding (``localmim.data.shards.write.write_shards``, verify-decode of every image, 2 worker processes) against
   ``tar -cf`` of the same files (pure pass-through: the ceiling for any packer).
2. Reading, 2 DataLoader workers, decode + RandomResizedCrop + flip + to-tensor, for (a) the shards through the
   project's one reader (``ClassifyShards`` + ``make_loader``: the webdataset pipeline of
   :mod:`localmim.data.shards.stream`, as fine-tuning, linear probing and pretraining read), (b) the same pipeline with
   webdataset's own tar reader (``tarfile_to_samples``) in place of :mod:`localmim.data.shards.tario`, (c) torchvision
   ``ImageFolder`` on the same images with the same transforms, (d) the same JPEG bytes held in memory (no file
   system, no tar parsing: the decode ceiling). Goal: (a) >= 1.0x (c) and >= 80% of (d).

All files are in the page cache (written just before); this measures CPU cost, not disk speed.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(root: Path, classes: int, per_class: int, min_side: int, max_side: int) -> int:
    from localmim.synth import write_imagenet

    n = write_imagenet(root, seed=0, num_classes=classes, per_class={"train": per_class}, min_side=min_side,
                       max_side=max_side, quality=90)  # fmt: skip
    return n["train"]


def _cpu() -> float:
    """CPU seconds of this process plus its reaped children (pool workers, DataLoader workers, tar)."""
    ch, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return ch.ru_utime + ch.ru_stime + me.ru_utime + me.ru_stime


def bench_sharding(src: Path, out: Path, workers: int, n: int) -> dict[str, float]:
    from localmim.data.shards.write import ShardOptions, write_shards

    per_shard = -(-n // (4 * workers))  # 4 shards per reader worker: balanced DataLoader workers
    c, t = _cpu(), time.perf_counter()
    man = write_shards(src, out, "train", ShardOptions(max_samples_per_shard=per_shard, workers=workers),
                       progress=False)  # fmt: skip
    shard_s, shard_cpu = time.perf_counter() - t, _cpu() - c
    c, t = _cpu(), time.perf_counter()
    subprocess.run(["tar", "-cf", str(out / "plain.tar"), "-C", str(src), "."], check=True)
    tar_s, tar_cpu = time.perf_counter() - t, _cpu() - c
    (out / "plain.tar").unlink()
    n = man["num_samples"]
    return {"images": n, "shard_s": shard_s, "shard_img_s": n / shard_s, "shard_cpu_us": shard_cpu / n * 1e6,
            "tar_s": tar_s, "tar_img_s": n / tar_s, "tar_cpu_us": tar_cpu / n * 1e6,
            "num_shards": man["num_shards"]}  # fmt: skip


class InMemory:
    """Map-style dataset over JPEG bytes already in memory (the decode ceiling)."""

    def __init__(self, items: list[tuple[bytes, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        data, cls = self.items[i]
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB")), cls


def _epoch(loader, n_expected: int) -> tuple[float, float]:
    """One epoch: (images/s wall clock, CPU microseconds per image summed over this process and its workers).

    Workers are not persistent, so they are reaped at the end of the epoch and their CPU time shows up in
    ``RUSAGE_CHILDREN``: the CPU cost is independent of what else the (possibly shared) machine runs.
    """
    count = 0
    c0, t0 = _cpu(), time.perf_counter()
    for x, _y in loader:
        count += x.shape[0]
    dt = time.perf_counter() - t0
    del x
    gc.collect()
    assert count == n_expected, (count, n_expected)
    return count / dt, (_cpu() - c0) / count * 1e6


def _wds_tar_shards(shard_dir: Path, tf, batch: int):
    """Reader (b): ``ClassifyShards`` whose tar stage is webdataset's ``tarfile_to_samples`` (one rank)."""
    import webdataset as wds

    from localmim.data.classify import ClassifyShards
    from localmim.data.shards.stream import worker_shards

    class WdsTar(ClassifyShards):
        def samples(self, wid: int = 0, nw: int = 1):
            plan = worker_shards(self.shards, seed=0, epoch=0, shuffle=False, wid=wid, nw=nw)
            return iter(wds.DataPipeline(lambda: iter(plan), wds.tarfile_to_samples()))

    return WdsTar(shard_dir, tf, batch_size=batch, train=False)


def bench_reading(src: Path, shard_dir: Path, size: int, workers: int, batch: int, rounds: int) -> dict[str, float]:
    """Readers interleaved for ``rounds`` epochs each (after one warm-up epoch: page cache hot). Reported: the
    best wall-clock rate and the lowest CPU cost per image (least disturbed epoch); ratios use the CPU cost,
    which a shared machine disturbs much less than wall time (on dedicated cores, rate = workers / CPU cost)."""
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from localmim.data.classify import ClassifyShards, make_loader
    from localmim.data.raw.imagefile import read_image  # the one reader of image files (issue 21)
    from localmim.data.shards.manifest import shard_set
    from localmim.data.shards.stream import raw_samples

    torch.set_num_threads(1)
    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    items = [(s["jpg"], int(s["cls"])) for s in raw_samples(shard_set(shard_dir, "train"))]
    n = len(items)
    kw = dict(batch_size=batch, num_workers=workers)
    loaders = {  # built per epoch, as training does
        "shards": lambda: make_loader(ClassifyShards(shard_dir, tf, batch_size=batch, train=False), workers),
        "wds_tar": lambda: make_loader(_wds_tar_shards(shard_dir, tf, batch), workers),
        "imagefolder": lambda: DataLoader(ImageFolder(str(src), tf, loader=read_image), shuffle=False, **kw),
        "memory": lambda: DataLoader(InMemory(items, tf), shuffle=False, **kw),
    }
    for make in loaders.values():
        _epoch(make(), n)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in loaders}
    for _ in range(rounds):
        for name, make in loaders.items():
            runs[name].append(_epoch(make(), n))
    res: dict[str, float] = {}
    for k, r in runs.items():
        res[f"{k}_img_s"] = max(x for x, _ in r)
        res[f"{k}_cpu_us"] = min(c for _, c in r)
    for k, name in (("imagefolder", "imagefolder"), ("memory", "ceiling"), ("wds_tar", "wds_tar")):
        res[f"shards_vs_{name}"] = res[f"{k}_cpu_us"] / res["shards_cpu_us"]
        # same ratio, robust to a load that drifts: median over rounds of the ratio within the round
        paired = sorted(a[1] / b[1] for a, b in zip(runs[k], runs["shards"], strict=True))
        res[f"shards_vs_{name}_paired"] = paired[len(paired) // 2]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=120)
    ap.add_argument("--min-side", type=int, default=96)
    ap.add_argument("--max-side", type=int, default=320)
    ap.add_argument("--size", type=int, default=64, help="RandomResizedCrop output side")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="timed epochs per reader (best is reported)")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "imagenet", Path(tmp) / "shards"
        t = time.perf_counter()
        n = make_images(src, args.classes, args.per_class, args.min_side, args.max_side)
        gen_s = time.perf_counter() - t
        mb = sum(p.stat().st_size for p in src.rglob("*.JPEG")) / 1e6
        load = [os.getloadavg()[0]]
        shard = bench_sharding(src / "train", out, args.workers, n)
        read = bench_reading(src / "train", out, args.size, args.workers, args.batch, args.rounds)
        load.append(os.getloadavg()[0])
    _report(args, n, mb, gen_s, shard, read, load)
    return 0


def _report(args, n: int, mb: float, gen_s: float, shard: dict, read: dict, load: list[float]) -> None:
    def rate(k: str) -> str:
        return f"{read[k + '_img_s']:.0f} | {read[k + '_cpu_us']:.0f}"

    rows = [
        ("shard: `localmim shard` (verify-decode, 2 procs)", f"{shard['shard_img_s']:.0f} | "
         f"{shard['shard_cpu_us']:.0f}", ""),
        ("shard: `tar -cf` same files (pass-through ceiling)", f"{shard['tar_img_s']:.0f} | {shard['tar_cpu_us']:.0f}",
         f"shard = {shard['shard_img_s'] / shard['tar_img_s']:.2f}x tar"),
        ("read: shards, the project's reader (`ClassifyShards`)", rate("shards"), ""),
        ("read: same pipeline, webdataset's `tarfile_to_samples`", rate("wds_tar"),
         f"our tar reader = {read['shards_vs_wds_tar']:.2f}x less CPU (paired {read['shards_vs_wds_tar_paired']:.2f})"),
        ("read: torchvision ImageFolder", rate("imagefolder"),
         f"shards = {read['shards_vs_imagefolder']:.2f}x ImageFolder "
         f"(paired {read['shards_vs_imagefolder_paired']:.2f}; goal >= 1.0)"),
        ("read: same bytes in memory (decode ceiling)", rate("memory"),
         f"shards = {100 * read['shards_vs_ceiling']:.0f}% of ceiling (paired "
         f"{100 * read['shards_vs_ceiling_paired']:.0f}%; goal >= 80%)"),
    ]  # fmt: skip
    print(f"{n} synthetic JPEGs ({mb:.1f} MB, sides {args.min_side}-{args.max_side} px, generated in {gen_s:.1f}s), "
          f"{shard['num_shards']} shards. Reading = decode + RandomResizedCrop({args.size}) + flip + ToTensor, "
          f"DataLoader(batch {args.batch}, {args.workers} workers), {args.rounds} interleaved epochs per reader after "
          "a warm-up; images/s = best epoch (wall clock), CPU = lowest CPU time per image over main process + "
          "workers. Read ratios are CPU-cost ratios (robust on a shared machine) of the lowest costs; `paired` = "
          "median over rounds of the ratio within one round (robust to a drifting load). 1-min load average "
          f"{load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores.\n")
    print("| what | images/s | CPU us/img | ratio |\n|---|---:|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "images": n, "megabytes": mb, "sharding": shard,
                                               "reading": read, "load_1min": load,
                                               "cores": os.cpu_count()}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the HOG targets on CPU: one multi-scale pass vs separate single-scale calls.

Batch of 8 at 224 x 224, cells (4, 8, 16, 32), nb 9 from uint8 (the ViT-B/16 recipe), torch threads = 2.
For scale, also times a reference-style evaluation written from method §4 (one 3x3 conv pass per scale and channel on
the normalised image, 12 in all) and the nb 18 per-scale-bias case (cells 8, 16, 32, 32, the Swin recipe).

Usage: ``python benchmarks/bench_targets.py [--json OUT] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from localmim.targets import hog, hog_multiscale, make_hog_bias, normalize

K0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def reference_style(images: torch.Tensor, nbins: int, cells: tuple[int, ...]) -> list[torch.Tensor]:
    """method §4 evaluated the straightforward way: a separate Sobel conv per scale and per colour channel."""
    x = normalize(images)  # [B, 3, H, W]
    weight = torch.stack([K0, K0.T]).unsqueeze(1)  # [2, 1, 3, 3]
    outs = []
    for cell in cells:
        per_channel = []
        for ch in range(3):
            xp = F.pad(x[:, ch:ch + 1], (1, 1, 1, 1), mode="reflect")  # [B, 1, H+2, W+2]
            grad = F.conv2d(xp, weight)  # [B, 2, H, W]
            mag = grad.norm(dim=1, keepdim=True)  # [B, 1, H, W]
            phi = torch.atan2(grad[:, 0:1], grad[:, 1:2])  # [B, 1, H, W]
            bins = torch.remainder(torch.floor(phi * nbins / math.pi), nbins).long()
            hist = torch.zeros(x.shape[0], nbins, x.shape[2], x.shape[3]).scatter_(1, bins, mag)  # [B, nb, H, W]
            per_channel.append(F.normalize(F.avg_pool2d(hist, cell), dim=1, eps=1e-12))
        outs.append(torch.cat(per_channel, dim=1))  # [B, 3*nb, H/c, W/c]
    return outs


def timed(fn, repeats: int) -> float:
    """Median wall time in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    normed = normalize(images)
    vit_cells, swin_cells = (4, 8, 16, 32), (8, 16, 32, 32)
    g = torch.Generator().manual_seed(0)
    biases = [make_hog_bias(g) for _ in swin_cells]
    small = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
    cases = {
        "hog_multiscale, uint8, nb 9, cells 4/8/16/32": lambda: hog_multiscale(images, 9, vit_cells),
        "4 x hog, uint8, nb 9, cells 4/8/16/32": lambda: [hog(images, 9, c) for c in vit_cells],
        "hog_multiscale, float, nb 9, cells 4/8/16/32": lambda: hog_multiscale(normed, 9, vit_cells),
        "reference-style (12 conv passes), nb 9": lambda: reference_style(images, 9, vit_cells),
        "hog_multiscale, uint8, nb 18, 4 biases, cells 8/16/32/32": lambda: hog_multiscale(images, 18, swin_cells,
                                                                                             biases),
        "small CPU recipe: hog_multiscale, uint8 64 x 3 x 64 x 64, nb 9, cells 2/4/8/16":
            lambda: hog_multiscale(small, 9, (2, 4, 8, 16)),
    }
    load_before = os.getloadavg()[0]
    results = {name: timed(fn, args.repeats) for name, fn in cases.items()}
    load = (load_before, os.getloadavg()[0])  # the machine is shared: a load above the core count inflates times

    base = results["hog_multiscale, uint8, nb 9, cells 4/8/16/32"]
    print(f"HOG targets, batch 8 x 3 x 224 x 224 unless stated, CPU, torch threads {args.threads}, "
          f"median of {args.repeats}, 1-min load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores\n")
    print("| case | ms / batch | x multiscale |")
    print("|---|---:|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": 8, "size": 224, "threads": args.threads, "repeats": args.repeats,
                       "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                       "load_average": load, "cpu_count": os.cpu_count(), "ms": results}, f, indent=2)


if __name__ == "__main__":
    main()

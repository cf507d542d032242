"""CPU throughput of the ViT pre-training models: forward + backward images/s and the target-computation share.

``python benchmarks/bench_models.py [--json OUT] [--threads 2] [--iters 3]``

One step = target computation from the uint8 batch (HOG / pixels, inside ``forward``) + masked forward
+ backward (no optimizer step), the quantity quoted in method §16: the reference ViT-B/16 needs about
2.4-2.7 s per batch of 8 at 224² on a 2-core CPU (2.9-3.3 images/s), ~1.0 s of it in its 12 HOG passes.
Prints a markdown section on stdout (for ``benchmarks/run_all.py``). Measurements, not tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localmim.models import create  # noqa: E402
from localmim.targets import normalize  # noqa: E402

REFERENCE_VIT_B_IMG_S = 3.3  # method §16, upper end of the reference range on a 2-core CPU

CASES = [  # (model, batch, variant)
    ("localmim_vit_base_patch16", 8, "fp32"),
    ("localmim_vit_base_patch16", 8, "reference-style fp32"),
    ("localmim_vit_base_patch16", 8, "bf16-autocast"),
    ("mae_vit_base_patch16", 8, "fp32"),
    ("localmim_vit_tiny_patch8", 32, "fp32"),
    ("localmim_vit_micro_patch8", 64, "fp32"),
]


@torch.no_grad()
def reference_style_hog(model, images: torch.Tensor) -> list[torch.Tensor]:
    """HOG targets computed the way method §4/§16 describe the reference doing it (for comparison only).

    One Sobel pass per (scale, colour channel) on the normalised float image: 4 x 3 = 12 passes, each with
    its own magnitude, orientation, one-hot histogram, pooling and L2 normalisation.
    """
    x = normalize(images)  # [B, 3, H, W]
    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    weight = torch.stack([k0, k0.T])[:, None]  # [2, 1, 3, 3]
    nb, out = model.hog_nbins, []
    for cell in model.target_cells:
        feats = []
        for ch in range(3):
            g = F.conv2d(F.pad(x[:, ch : ch + 1], (1, 1, 1, 1), mode="reflect"), weight)  # [B, 2, H, W]
            mag = g.norm(dim=1, keepdim=True)  # [B, 1, H, W]
            phi = torch.atan2(g[:, :1], g[:, 1:])
            bins = torch.floor(phi * nb / math.pi).long() % nb
            hist = torch.zeros(x.shape[0], nb, *x.shape[2:]).scatter_(1, bins, mag)  # [B, nb, H, W]
            feats.append(F.normalize(F.avg_pool2d(hist, cell, cell), dim=1))
        out.append(torch.cat(feats, dim=1).flatten(2).transpose(1, 2))  # [B, M_k, 3*nb]
    return out


def make_reference_style(model) -> None:
    """Unfused attention (the reference's timm-0.3-era path) and 12-pass HOG, otherwise the same model."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model.compute_targets = lambda images: reference_style_hog(model, images)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def bench(name: str, batch: int, variant: str, iters: int) -> dict:
    torch.manual_seed(0)
    model = create(name)
    amp = variant == "bf16-autocast"
    if variant.startswith("reference-style"):
        make_reference_style(model)
    s = model.img_size
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8)
    step_times, cpu_times, target_times = [], [], []
    for i in range(iters + 1):  # first iteration is warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = model(x)  # targets stay float32 inside (autocast disabled there)
        loss.backward()
        t1, c1 = time.perf_counter(), time.process_time()
        model.compute_targets(x)
        t2 = time.perf_counter()
        if i > 0:
            step_times.append(t1 - t0)
            cpu_times.append(c1 - c0)
            target_times.append(t2 - t1)
    step, tgt = _median(step_times), _median(target_times)
    return dict(model=name, img_size=s, batch=batch, target=model.target, variant=variant,
                step_s=step, images_per_s=batch / step,
                cpu_s=_median(cpu_times), target_s=tgt, target_share=tgt / step, iters=iters)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write raw numbers here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per model (after one warm-up)")
    ap.add_argument("--only", nargs="*", help="model names to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(n, b, v, args.iters) for n, b, v in CASES if not args.only or n in args.only]
    lines = [
        f"CPU, torch threads {args.threads}, median of {args.iters} steps after a warm-up; step = targets from "
        "uint8 + masked forward + backward (mask ratio 0.75).\n",
        "| model | img | batch | target | variant | step (s) | images/s | CPU time/step (s) | targets (s) "
        "| target share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['target']} | {r['variant']} | "
                     f"{r['step_s']:.3f} | "
                     f"{r['images_per_s']:.2f} | {r['cpu_s']:.3f} | {r['target_s']:.3f} | "
                     f"{100 * r['target_share']:.1f}% |")
    base = next((r for r in rows if r["model"] == "localmim_vit_base_patch16" and r["variant"] == "fp32"), None)
    if base:
        lines.append(f"\nViT-B/16 @224, batch 8, fp32: {base['images_per_s']:.2f} images/s = "
                     f"{base['images_per_s'] / REFERENCE_VIT_B_IMG_S:.2f}x the reference's ~{REFERENCE_VIT_B_IMG_S} "
                     "images/s (method §16, 2-core CPU; its HOG alone took ~1.0 s of a ~2.5 s step).")
    ref = next((r for r in rows if r["variant"].startswith("reference-style")), None)
    if base and ref:
        lines.append(f"Same machine, same run: {ref['cpu_s'] / base['cpu_s']:.2f}x less CPU time per step and "
                     f"{ref['step_s'] / base['step_s']:.2f}x wall-time speed-up over the reference-style variant "
                     "(unfused attention, 12-pass HOG on the normalised image).")
    lines.append(f"\nLoad average when done: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a loaded machine "
                 "inflates wall times; CPU time/step is the process CPU time, all threads).")
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        raw = dict(threads=args.threads, loadavg=os.getloadavg()[0], rows=rows)
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

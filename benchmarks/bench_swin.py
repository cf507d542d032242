"""Swin LocalMIM: visible-only encoder vs the dense (all tokens, SimMIM-style) computation, fwd+bwd on CPU.

Both paths use the same modules, the same mask (r = 0.75, shared by the batch), the same 4 decoders and the
same precomputed targets; only the encoder differs. The dense path replaces masked patch tokens with a learnable
mask token and runs timm's full-grid Swin (cyclic-shift window attention on every token), as SimMIM does.
Also compares the visible-token attention formulations (one padded group per window vs one masked L x L).

Usage: ``python benchmarks/bench_swin.py [--json out.json] [--threads 2] [--iters 3] [--parts base small attention]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from localmim.models import create
from localmim.models.common import masked_mse, resize_mask


def dense_simmim_loss(model, images: torch.Tensor, cell_mask: torch.Tensor, targets, mask_token) -> torch.Tensor:
    """Same loss as ``model.forward`` but with the encoder on all tokens (masked ones = mask token)."""
    x = model.encoder.patch_embed(model._to_input(images))  # [B, R0, R0, C]
    B, R, _, _ = x.shape
    g = model.grid
    pix = cell_mask.view(g, g).repeat_interleave(R // g, 0).repeat_interleave(R // g, 1).to(x.device)  # [R0, R0]
    x = torch.where(pix[None, :, :, None], mask_token.to(x.dtype), x)
    taps = model.encoder.forward_grid(x)  # NHWC
    mask = cell_mask.float().expand(B, -1).view(B, g, g)
    loss = 0.0
    for i, k in enumerate(model.taps):
        z = model.tap_norms[i](taps[k].flatten(1, 2))  # [B, M_k, C_k] raster, nothing to fill in
        pred = model.heads[i](model.decoders[i](z, torch.arange(z.shape[1], device=z.device)))
        loss = loss + masked_mse(pred, targets[i], resize_mask(mask, model.scales[i]))
    return loss


def time_step(fn, params) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one fwd+bwd step."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn().backward()
    for p in params:
        p.grad = None
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(name: str, batch: int, iters: int, impls=("auto",)) -> dict:
    """Time the dense SimMIM-style path and the visible-only path(s), interleaved round by round.

    Interleaving exposes every path to the same background load; the minimum over rounds is reported (the
    least-disturbed step), for wall clock and for CPU time alike.
    """
    torch.manual_seed(0)
    model = create(name)
    mask_token = nn.Parameter(torch.zeros(1, 1, 1, model.encoder.dims[0]))
    params = [*model.parameters(), mask_token]
    images = torch.randint(0, 256, (batch, 3, model.img_size, model.img_size), dtype=torch.uint8)
    targets = model.compute_targets(images)
    cell_mask = model.draw_mask(0.75, torch.Generator().manual_seed(0))

    def visible(impl):
        def step():
            model.encoder.attn_impl = impl
            return model(images, targets=targets, cell_mask=cell_mask)[0]
        return step

    paths = {"dense": lambda: dense_simmim_loss(model, images, cell_mask, targets, mask_token)}
    paths.update({f"visible_{impl}": visible(impl) for impl in impls})
    times = {k: [] for k in paths}
    for r in range(iters + 1):  # round 0 is the warm-up
        for k, fn in paths.items():
            t = time_step(fn, params)
            if r:
                times[k].append(t)
    out = {"model": name, "batch": batch, "visible_cells": int((~cell_mask).sum()), "cells": cell_mask.numel(),
           "load_avg_1min": os.getloadavg()[0]}
    out.update({k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()})
    return out


def attention_formulations(iters: int) -> list[dict]:
    """Per-block fwd+bwd CPU time (1 thread, process time: robust to a shared machine) of packed vs dense.

    Swin-B at 224, 12 visible cells (reference count), batch 4; one block per (stage, shift).
    """
    from localmim.models.swin_geometry import dense_plan, packed_plan, token_coords

    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model = create("localmim_swin_base", depths=(2, 2, 2, 2), reference_mask_count=True)
    enc = model.encoder
    visible = (~model.draw_mask(0.75, torch.Generator().manual_seed(0))).nonzero()[:, 0]
    rows = []
    for i, stage in enumerate(enc.layers):
        y, x = token_coords(visible, enc.grid, 8 >> i)
        for blk in stage.blocks:
            key = (blk.window_size[0], blk.shift_size[0])
            row = {"stage": i + 1, "tokens": y.numel(), "window": key[0], "shift": key[1]}
            for impl, make in (("packed", packed_plan), ("dense", dense_plan)):
                plan = make(y, x, enc.grid * (8 >> i), *key)
                inp = torch.randn(4, y.numel(), enc.dims[i], requires_grad=True)
                step = lambda blk=blk, plan=plan, inp=inp: enc._block_forward(blk, inp, plan).sum().backward()
                step()
                start = time.process_time()
                for _ in range(iters):
                    step()
                row[f"{impl}_ms"] = 1e3 * (time.process_time() - start) / iters
            rows.append(row)
    torch.set_num_threads(old)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--parts", nargs="*", default=["base", "small", "attention"],
                    help="subset of: base (Swin-B 224, batch 4), small (Swin-T 64 px p0 2, batch 8), attention")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = {"base": ("localmim_swin_base", 4, ("auto", "packed")),
               "small": ("localmim_swin_tiny_p2_64", 8, ("auto", "packed", "dense"))}
    runs = [bench(*configs[p][:2], args.iters, impls=configs[p][2]) for p in configs if p in args.parts]
    print(f"Encoder paths, fwd+bwd on CPU ({args.threads} threads), mask ratio 0.75, same decoders and "
          f"precomputed targets, best of {args.iters} interleaved rounds after 1 warm-up. Each cell: images/s "
          "(wall clock) / CPU seconds per image (process time). `auto` = packed windows, one dense masked "
          "attention where a block has <= 2w^2 visible tokens.\n")
    paths = ["dense", "visible_auto", "visible_packed", "visible_dense"]
    print("| model | batch | visible cells | load avg | dense SimMIM-style | visible auto | visible packed | "
          "visible dense | speed-up wall / CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        cells = [f"{r['batch'] / r[p][0]:.2f} / {r[p][1] / r['batch']:.3f}" if p in r else "-" for p in paths]
        speed = f"{r['dense'][0] / r['visible_auto'][0]:.2f}x / {r['dense'][1] / r['visible_auto'][1]:.2f}x"
        print(f"| {r['model']} | {r['batch']} | {r['visible_cells']}/{r['cells']} | {r['load_avg_1min']:.1f} | "
              + " | ".join(cells) + f" | {speed} |")
    rows = attention_formulations(max(3, args.iters)) if "attention" in args.parts else []
    print("\nVisible-token attention formulations, one Swin-B block fwd+bwd (batch 4, 12 visible cells, 1 thread, "
          "CPU process time in ms):\n")
    print("| stage | visible tokens | window / shift | packed | dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['tokens']} | {r['window']} / {r['shift']} | {r['packed_ms']:.1f} | "
              f"{r['dense_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "attention": rows}, f, indent=2)


if __name__ == "__main__":
    main()

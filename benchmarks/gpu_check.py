"""One prepared GPU measurement run (issue 13 §4), sized for ~8 minutes of one H200; JSON results under ``--out``.

``python benchmarks/gpu_check.py --out $OUT`` measures, each part guarded (a failure is recorded, the rest runs):

1. ``pretrain``: ViT-B/16 LocalMIM pre-training end to end from shards through ``run_pretrain`` (bf16 autocast,
   DataLoader workers, pinned memory): images/s end-to-end and compute-only, data-wait fraction, peak memory,
   for fused attention on/off and ``torch.compile`` off/on;
2. ``max_batch``: the largest per-GPU batch whose bf16 fwd+bwd step fits (doubling until out of memory), with
   images/s and peak memory per batch size (in-memory images: the model alone);
3. ``swin``: Swin-B visible-only encoder vs the dense SimMIM-style computation (``bench_swin.py``'s), bf16,
   CUDA-synchronised median step times;
4. ``miniature``: ``localmim_vs_mae.py --preset gpu`` with the time left (its JSON is rewritten after every run,
   so a cut-off run keeps the finished seeds).

``--dry-run``: tiny models and data on whatever device there is (CPU here), to check the script end to end.
Writes ``gpu_check.json`` (everything) and the miniature's ``localmim_vs_mae.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FULL = dict(model="localmim_vit_base_patch16", size=224, images=6144, sides=(256, 480), batch=256, workers=14,
            swin="localmim_swin_base", swin_batch=64, max_batch=8192, skip=4, mini=["--preset", "gpu"])
DRY = dict(model="localmim_vit_micro_patch8", size=32, images=64, sides=(40, 64), batch=16, workers=1,
           swin="localmim_swin_nano_p2_64", swin_batch=2, max_batch=64, skip=1,
           mini=["--preset", "smoke", "--seeds", "2", "--epochs", "1"])


def make_shards(root: Path, n: int, shards: int, sides: tuple[int, int]) -> Path:
    """``n`` blocky random JPEGs (sides in ``sides``; ImageNet-like sizes for the full run) in ``shards`` tars, so
    that every DataLoader worker gets shards (``PretrainStream`` deals whole shards to workers)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    out = root / "shards"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = -(-n // shards)
    rows = []
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        ids = range(s * per, min(n, (s + 1) * per))
        with wds.TarWriter(str(out / name)) as w:
            for i in ids:
                h, wd = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
                base = rng.integers(0, 256, (h // 8 + 1, wd // 8 + 1, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :wd]).save(buf, "JPEG", quality=90)
                w.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "cls": b"0"})
        rows.append({"name": name, "num_samples": len(ids)})
    (out / "train.json").write_text(json.dumps({"shards": rows}))
    return out


def part_pretrain(p: dict, root: Path, dry: bool) -> dict:
    """End-to-end pre-training throughput from shards, per variant (fused attention, torch.compile)."""
    from bench_pretrain import run_variant

    from localmim.config.pretrain import PretrainConfig

    t = time.time()
    shards = make_shards(root, p["images"], max(2, 2 * p["workers"]), p["sides"])
    print(f"gpu_check: {p['images']} JPEGs in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    base = dict(model=p["model"], input_size=p["size"], global_batch=p["batch"], batch_size=p["batch"], epochs=1,
                warmup_epochs=0, num_workers=p["workers"], shuffle_buffer=256, ckpt_minutes=0, ckpt_every=1,
                log_every=1, knn_every=0, device="auto", amp="auto")
    variants = {"fused, eager": dict(fused_attn="on"), "unfused, eager": dict(fused_attn="off"),
                "fused, compile": dict(fused_attn="on", compile=True)}
    if dry:
        variants.pop("fused, compile")  # minutes of compilation on CPU
    out = {}
    for name, kw in variants.items():
        print(f"gpu_check: pretrain {name}", file=sys.stderr, flush=True)
        cfg = PretrainConfig(**base, **kw)
        out[name] = run_variant(cfg, shards, root / "ck" / name.replace(", ", "_"), p["skip"])
    return out


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def part_max_batch(p: dict, dev) -> dict:
    """Largest batch whose bf16 fwd+bwd fits; images/s (median of 3 steps after 1 warm-up) per batch."""
    import torch

    from localmim.models import create

    model = create(p["model"], img_size=p["size"]).to(dev)
    amp = dev.type == "cuda"
    rows, b = [], p["batch"]
    while b <= p["max_batch"]:
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            x = torch.randint(0, 256, (b, 3, p["size"], p["size"]), dtype=torch.uint8, device=dev)
            times = []
            for _ in range(4):
                t = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss = model(x, mask_ratio=0.75)[0]
                loss.backward()
                model.zero_grad(set_to_none=True)
                _sync(dev)
                times.append(time.perf_counter() - t)
            mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
            rows.append({"batch": b, "images_per_s": b / statistics.median(times[1:]), "peak_gib": mem})
            print(f"gpu_check: batch {b}: {rows[-1]['images_per_s']:.0f} images/s, {mem:.1f} GiB", file=sys.stderr)
            b *= 2
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "oom": True})
            break
        finally:
            x = loss = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    fits = [r["batch"] for r in rows if not r.get("oom")]
    return {"rows": rows, "largest_fitting": max(fits) if fits else None, "searched_up_to": p["max_batch"]}


def part_swin(p: dict, dev) -> dict:
    """Swin-B fwd+bwd: visible-only encoder vs dense SimMIM-style, bf16, median of 5 synchronised steps."""
    import torch
    from bench_swin import dense_simmim_loss

    from localmim.models import create

    torch.manual_seed(0)
    model = create(p["swin"]).to(dev)
    mask_token = torch.nn.Parameter(torch.zeros(1, 1, 1, model.encoder.dims[0], device=dev))
    x = torch.randint(0, 256, (p["swin_batch"], 3, model.img_size, model.img_size), dtype=torch.uint8, device=dev)
    targets = model.compute_targets(x)
    cell_mask = model.draw_mask(0.75, torch.Generator().manual_seed(0))
    paths = {"dense": lambda: dense_simmim_loss(model, x, cell_mask, targets, mask_token),
             "visible": lambda: model(x, targets=targets, cell_mask=cell_mask)[0]}
    res = {}
    for name, fn in paths.items():
        times = []
        for _ in range(6):
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
            mask_token.grad = None
            _sync(dev)
            times.append(time.perf_counter() - t)
        res[name] = {"step_s": statistics.median(times[1:]), "images_per_s": p["swin_batch"] / statistics.median(
            times[1:])}
    res["speedup"] = res["dense"]["step_s"] / res["visible"]["step_s"]
    res.update(model=p["swin"], batch=p["swin_batch"], visible_cells=int((~cell_mask).sum()))
    return res


def part_miniature(p: dict, out: Path, work: Path, seconds_left: float) -> dict:
    cmd = [sys.executable, str(HERE / "localmim_vs_mae.py"), *p["mini"], "--work", str(work / "mini"),
           "--out", str(out / "localmim_vs_mae"), "--json", str(out / "localmim_vs_mae.json")]
    t = time.time()
    try:
        r = subprocess.run(cmd, timeout=max(30.0, seconds_left), capture_output=True, text=True)
        return {"rc": r.returncode, "seconds": time.time() - t, "stderr_tail": r.stderr[-3000:]}
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        return {"rc": "timeout", "seconds": time.time() - t,
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="result directory (default $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="tiny settings (checks the script on CPU)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total seconds; the miniature gets what is left")
    ap.add_argument("--parts", nargs="*", default=["pretrain", "max_batch", "swin", "miniature"])
    args = ap.parse_args()

    import torch

    from localmim.runtime.distributed import resolve_device

    t0 = time.time()
    p = DRY if args.dry_run else FULL
    dev = resolve_device("auto")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "dry_run": args.dry_run,
                 "torch": torch.__version__, "settings": p, "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            t = time.time()
            try:
                if part == "pretrain":
                    r = part_pretrain(p, Path(tmp) / "pretrain", args.dry_run)
                elif part == "max_batch":
                    r = part_max_batch(p, dev)
                elif part == "swin":
                    r = part_swin(p, dev)
                else:
                    r = part_miniature(p, out, Path(tmp), args.budget_s - (time.time() - t0))
            except Exception as e:  # a measurement run: record the failure, keep going
                r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            res["parts"][part] = {**r, "part_seconds": time.time() - t}
            (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
            print(f"gpu_check: {part} done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    res["seconds"] = time.time() - t0
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "parts"} | {
        k: ("error" if "error" in v else "ok") for k, v in res["parts"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

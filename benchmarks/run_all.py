"""Run every benchmark and rewrite ``benchmarks/RESULTS.md`` (``make bench``).

Each ``bench_*.py`` script prints a markdown section on stdout and writes its raw numbers with ``--json``.
Benchmarks are measurements, not tests: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_shards.py", "bench_manifest.py", "bench_image_check.py", "bench_targets.py", "bench_models.py",
         "bench_swin.py", "bench_pretrain.py", "bench_segment.py", "bench_detect.py", "bench_grad_ckpt.py"]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}; {dev}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", help="run only these scripts")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--with-mae", action="store_true",
                    help="also rerun localmim_vs_mae.py (about an hour on 2 free cores)")
    ap.add_argument("--with-transfer", action="store_true",
                    help="also rerun transfer.py (segment and detect from LocalMIM, MAE, random init; about an hour)")
    args = ap.parse_args()
    scripts = [s for s in ORDER if (HERE / s).is_file() and (not args.only or s in args.only)]
    (HERE / "results").mkdir(exist_ok=True)
    sections = []
    for s in scripts:
        print(f"== {s}", file=sys.stderr, flush=True)
        p = subprocess.run(
            [sys.executable, str(HERE / s), "--json", str(HERE / "results" / (Path(s).stem + ".json"))],
            capture_output=True, text=True,
        )  # fmt: skip
        body = p.stdout.strip() if p.returncode == 0 else f"FAILED ({p.returncode}):\n```\n{p.stderr[-3000:]}\n```"
        sections.append(f"## {s}\n\n{body}\n")
    head = (
        "# Benchmark results\n\n"
        f"Produced by `make bench` on {datetime.date.today()} ({machine()}).\n"
        "Numbers are for this machine; compare ratios, not absolutes.\n\n"
    )
    # The long comparisons (each its own one command) are included as last measured, rerun only when asked.
    tail = ""
    for name, rerun in (("localmim_vs_mae", args.with_mae), ("transfer", args.with_transfer)):
        if rerun:
            extra = ["--json", str(HERE / "localmim_vs_mae.json")] if name == "localmim_vs_mae" else []
            subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra])
        md = HERE / f"{name}.md"
        if md.is_file():
            tail += f"\n## {name}.py\n\n{md.read_text().strip()}\n"  # each .md ends with its plot
    Path(args.out).write_text(head + "\n".join(sections) + tail)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark and rewrite the generated regions of ``benchmarks/RESULTS.md`` (``make bench``).

Each ``bench_*.py`` script prints a markdown section on stdout and writes its raw numbers with ``--json``.
Benchmarks are measurements, not tests: nothing here fails on a slow machine.

RESULTS.md mixes generated tables with hand-written analysis. Only the text between
``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->`` is rewritten (NAME: a script's stem, ``header``
for the date and machine, ``localmim_vs_mae`` / ``transfer`` for the long comparisons' ``.md``); every other byte of
the file is kept. A region that a run needs and the file lacks is an error before any benchmark runs (not an append:
a section pasted in without markers would otherwise appear twice); a missing file is created with every region.
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
LONG = ("localmim_vs_mae", "transfer")  # each its own one command; included as last measured (its .md)
BEGIN, END = "<!-- BEGIN generated: {} -->", "<!-- END generated: {} -->"


class RegionError(ValueError):
    """A generated region of the results file is missing or malformed."""


def _span(text: str, name: str, source: str) -> tuple[int, int]:
    """(start, end) of region ``name``'s content in ``text`` (markers excluded)."""
    b, e = BEGIN.format(name), END.format(name)
    nb, ne = text.count(b), text.count(e)
    if nb == 0 and ne == 0:
        raise RegionError(f"{source}: no generated region {name!r}: add the two lines {b!r} and {e!r} where its "
                          f"section goes (everything outside such markers is kept as written)")
    if nb != 1 or ne != 1:
        raise RegionError(f"{source}: region {name!r} needs exactly one {b!r} and one {e!r}, found {nb} and {ne}")
    i, j = text.index(b) + len(b), text.index(e)
    if j < i:
        raise RegionError(f"{source}: region {name!r}: {e!r} comes before {b!r}")
    if "<!-- BEGIN generated:" in text[i:j]:
        raise RegionError(f"{source}: region {name!r} holds the BEGIN marker of another region")
    return i, j


def check_regions(text: str, names: list[str], source: str) -> None:
    """Raise :class:`RegionError` naming every region of ``names`` that ``text`` lacks (or holds malformed)."""
    errors = []
    for name in names:
        try:
            _span(text, name, source)
        except RegionError as err:
            errors.append(str(err))
    if errors:
        raise RegionError("\n".join(errors))


def splice(text: str, bodies: dict[str, str], source: str = "RESULTS.md") -> str:
    """``text`` with each region's content replaced by its body (a blank line either side); all else unchanged."""
    check_regions(text, list(bodies), source)
    for name, body in bodies.items():
        if "<!-- BEGIN generated:" in body or "<!-- END generated:" in body:
            raise RegionError(f"{source}: the new body of region {name!r} contains a region marker")
        i, j = _span(text, name, source)
        text = f"{text[:i]}\n\n{body.strip()}\n\n{text[j:]}"
    return text


def skeleton() -> str:
    """A results file with every region (empty), for a first run."""
    parts = ["# Benchmark results\n", f"{BEGIN.format('header')}\n{END.format('header')}\n"]
    for name in [Path(s).stem for s in ORDER] + list(LONG):
        parts.append(f"## {name}.py\n\n{BEGIN.format(name)}\n{END.format(name)}\n")
    return "\n".join(parts)


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


def run_scripts(scripts: list[str], stamp: str | None) -> dict[str, str]:
    """Region name -> markdown of each script's run (``stamp``: a first line saying when, for a partial run)."""
    (HERE / "results").mkdir(exist_ok=True)
    bodies = {}
    for s in scripts:
        print(f"== {s}", file=sys.stderr, flush=True)
        p = subprocess.run(
            [sys.executable, str(HERE / s), "--json", str(HERE / "results" / (Path(s).stem + ".json"))],
            capture_output=True, text=True,
        )  # fmt: skip
        body = p.stdout.strip() if p.returncode == 0 else f"FAILED ({p.returncode}):\n```\n{p.stderr[-3000:]}\n```"
        bodies[Path(s).stem] = f"{stamp}\n\n{body}" if stamp else body
    return bodies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these scripts (the other regions keep their text)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--with-mae", action="store_true",
                    help="also rerun localmim_vs_mae.py (about an hour on 2 free cores)")
    ap.add_argument("--with-transfer", action="store_true",
                    help="also rerun transfer.py (segment and detect from LocalMIM, MAE, random init; about an hour)")
    args = ap.parse_args()
    out = Path(args.out)
    scripts = [s for s in ORDER if (HERE / s).is_file() and (not args.only or s in args.only)]
    rerun = {"localmim_vs_mae": args.with_mae, "transfer": args.with_transfer}
    longs = [n for n in LONG if rerun[n] or (HERE / f"{n}.md").is_file()]
    text = out.read_text() if out.is_file() else skeleton()
    check_regions(text, ["header", *(Path(s).stem for s in scripts), *longs], str(out))  # before an hour of work
    when = f"{datetime.date.today()} ({machine()})"
    partial = bool(args.only)
    bodies = run_scripts(scripts, f"_Rerun alone (`run_all.py --only`) on {when}._" if partial else None)
    if not partial:
        bodies["header"] = f"Produced by `make bench` on {when}.\nNumbers are for this machine; compare ratios, not " \
                           "absolutes."
    for name in LONG:
        if rerun[name]:
            extra = ["--json", str(HERE / "localmim_vs_mae.json")] if name == "localmim_vs_mae" else []
            subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra])
        if (HERE / f"{name}.md").is_file():
            bodies[name] = (HERE / f"{name}.md").read_text()  # each .md ends with its plot
    sys.path.insert(0, str(HERE.parent))
    from localmim.utils.io import atomic_write_text

    atomic_write_text(out, splice(out.read_text() if out.is_file() else text, bodies, str(out)))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RegionError as err:
        print(f"run_all.py: error: {err}", file=sys.stderr)
        sys.exit(2)

"""``make bench`` (benchmarks/run_all.py) rewrites only the generated regions of benchmarks/RESULTS.md: the splice
keeps every byte outside the markers, refuses a file that lacks a region it needs before running anything, and the
committed RESULTS.md holds a region for everything run_all generates."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from benchmarks.run_all import LONG, ORDER, RegionError, check_regions, splice
from tests.conftest import ROOT

B, E = "<!-- BEGIN generated: {} -->", "<!-- END generated: {} -->"
# Independent of run_all's parser: a region is its BEGIN marker up to its END marker.
REGION = re.compile(r"<!-- BEGIN generated: (\w+) -->.*?<!-- END generated: \1 -->", re.S)


def _outside(text: str) -> list[str]:
    return REGION.split(text)[::2]  # the text around the regions (split also returns the captured names)


HAND = ("# Results\n\n" + B.format("header") + "\nold header\n" + E.format("header") + "\n\n## a.py\n\nHand-written "
        "intro, kept:  trailing spaces, ünïcode, `code`.\n\n" + B.format("a") + "\n\n| old | table |\n|---|---|\n\n"
        + E.format("a") + "\n\nHand analysis after the table.\n\n## b.py\n\n" + B.format("b") + "\n\nold b\n\n"
        + E.format("b") + "\nno blank line before this hand text\n")


def test_splice_rewrites_regions_and_keeps_everything_else():
    out = splice(HAND, {"a": "| new | table |\n|---|---|\n| 1 | 2 |\n", "header": "Produced today."})
    assert _outside(out) == _outside(HAND)  # byte for byte outside the markers
    assert f"{B.format('a')}\n\n| new | table |\n|---|---|\n| 1 | 2 |\n\n{E.format('a')}" in out
    assert f"{B.format('header')}\n\nProduced today.\n\n{E.format('header')}" in out
    assert "old b" in out and "old header" not in out and "| old | table |" not in out
    assert splice(out, {"a": "| new | table |\n|---|---|\n| 1 | 2 |"}) == out  # same body: same file


def test_missing_or_broken_markers_are_clear_errors():
    with pytest.raises(RegionError, match=r"R\.md: no generated region 'c': add the two lines '<!-- BEGIN generated"):
        splice(HAND, {"c": "x"}, "R.md")
    with pytest.raises(RegionError) as err:
        check_regions(HAND, ["a", "c", "d"], "R.md")
    assert "'c'" in str(err.value) and "'d'" in str(err.value) and "'a'" not in str(err.value)
    with pytest.raises(RegionError, match="exactly one"):
        splice(HAND + B.format("a") + "\n", {"a": "x"}, "R.md")
    with pytest.raises(RegionError, match="holds the BEGIN marker of another region"):
        splice(B.format("x") + "\n" + B.format("y") + "\n" + E.format("x") + E.format("y"), {"x": "1"}, "R.md")
    with pytest.raises(RegionError, match="comes before"):
        splice(E.format("z") + "\n" + B.format("z") + "\n", {"z": "x"}, "R.md")
    with pytest.raises(RegionError, match="contains a region marker"):
        splice(HAND, {"a": E.format("a")}, "R.md")


def test_run_all_refuses_a_file_without_the_region_before_running_anything(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nHand-written only.\n")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--out", str(out), "--only",
                        "bench_targets.py"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2 and "no generated region 'bench_targets'" in p.stderr and str(out) in p.stderr
    assert "== bench_targets.py" not in p.stderr  # nothing ran
    assert out.read_text() == "# Results\n\nHand-written only.\n"


def test_committed_results_have_every_region_run_all_writes():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    names = ["header", *(s.removesuffix(".py") for s in ORDER), *LONG]
    check_regions(text, names, "benchmarks/RESULTS.md")
    assert sorted(m.group(1) for m in REGION.finditer(text)) == sorted(names)
    out = splice(text, dict.fromkeys(names, "regenerated"))
    assert _outside(out) == _outside(text)  # the hand-written analysis survives a full rerun
    assert "Measured 2026-12-04 on the quiet 2-core machine" in out.split(E.format("transfer"))[1]  # after the .md
    after_shards = out.split(E.format("bench_shards"))[1].split("<!-- BEGIN")[0]
    assert after_shards.startswith("\n\nRerun on 2026-12-01 (quiet machine")  # hand-written, right after its table

"""Every section citation in the repository names a heading of ``docs/method.md``.

Citations look like ``method §8.1``, ``SPEC §13.18`` (the old name of the same document), a bare ``§2.6``, a range
``§3.1-3.4`` (both ends are checked) or ``§13 item 15`` / ``§13 items 14, 16`` (pitfall headings ``13.15``, ...).
``§4 step 1`` points into a numbered list of section 4 and is checked as ``4``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SCANNED = ("localmim", "tests", "benchmarks", "configs", "docs", "README.md", "params.yaml", "Makefile")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".smk", ""}

HEADING = re.compile(r"^(#{2,3}) (\d+)\.(\d+)?[ ]", re.MULTILINE)
NUM = r"\d+(?:\.\d+)?"
CITATION = re.compile(
    rf"§\s*(?P<first>{NUM})"
    rf"(?:\s*[-–]\s*(?P<last>{NUM}))?"
    r"(?:\s+items?\s+(?P<items>\d+(?:\s*(?:,|and|&)\s*\d+)*))?"
)


def headings(text: str) -> list[str]:
    """Section numbers in document order: ``## 8. Title`` -> ``"8"``, ``### 8.1 Title`` -> ``"8.1"``."""
    out = []
    for level, major, minor in HEADING.findall(text):
        if (level == "##") != (minor == ""):
            raise ValueError(f"heading level {level} does not match its number {major}.{minor}")
        out.append(major if not minor else f"{major}.{minor}")
    return out


def cited_sections(text: str) -> list[str]:
    """Every section number that ``text`` cites (see the module docstring for the accepted forms)."""
    out = []
    for m in CITATION.finditer(text):
        if m["items"]:
            out += [f"{m['first']}.{k}" for k in re.findall(r"\d+", m["items"])]
            continue
        out.append(m["first"])
        if m["last"]:
            last = m["last"]
            if "." not in last and "." in m["first"]:  # "§3.1-4" means 3.1 to 3.4
                last = f"{m['first'].split('.')[0]}.{last}"
            out.append(last)
    return out


def missing_citations(text: str, known: set[str]) -> list[str]:
    return [c for c in cited_sections(text) if c not in known]


def _files() -> list[Path]:
    files = []
    for name in SCANNED:
        p = ROOT / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in SUFFIXES
                      and "__pycache__" not in f.parts and f.resolve() != Path(__file__).resolve()]
    return files


@pytest.fixture(scope="module")
def known() -> set[str]:
    return set(headings(METHOD.read_text(encoding="utf-8")))


def test_method_headings_are_unique_and_in_order():
    nums = headings(METHOD.read_text(encoding="utf-8"))
    keys = [tuple(int(x) for x in n.split(".")) for n in nums]
    assert len(set(nums)) == len(nums), [n for n in nums if nums.count(n) > 1]
    assert keys == sorted(keys)
    majors = [k[0] for k in keys if len(k) == 1]
    assert majors == list(range(majors[0], majors[0] + len(majors)))  # no gaps in the top-level numbering
    assert {"8.1", "9.1", "10.2", "13.18", "14.3"} <= set(nums)


def test_every_citation_names_an_existing_section(known):
    bad = {}
    n = 0
    for f in _files():
        text = f.read_text(encoding="utf-8", errors="replace")
        n += len(cited_sections(text))
        miss = missing_citations(text, known)
        if miss:
            bad[str(f.relative_to(ROOT))] = sorted(set(miss))
    assert n > 50, f"only {n} citations found: is the scanner looking at the right files?"
    assert not bad, f"citations of sections that docs/method.md does not have: {bad}"


@pytest.mark.parametrize(
    ("text", "cited"),
    [
        ("see method §8.1 and SPEC §2.6", ["8.1", "2.6"]),
        ("(SPEC §13 item 15)", ["13.15"]),
        ("(§13 items 14, 16)", ["13.14", "13.16"]),
        ("SPEC §3.1-3.4", ["3.1", "3.4"]),
        ("§4 steps 3-4", ["4"]),
        ("SPEC §2.8 / §3.9 and method §10.1 [X]", ["2.8", "3.9", "10.1"]),
    ],
)
def test_parser_reads_each_citation_form(text, cited):
    assert cited_sections(text) == cited


def test_parser_reports_made_up_sections(known):
    text = "as in method §99.1, SPEC §13 item 42 and §8.7; valid: method §8.2"
    assert missing_citations(text, known) == ["99.1", "13.42", "8.7"]
    with pytest.raises(ValueError, match="does not match"):
        headings("## 8.1 A subsection written as a section\n")

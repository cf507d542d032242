"""utils.io.replace_dir, the one directory swap of every stage: the old output is kept until the new one is complete.
A crash in each window (simulated in-process, then a real SIGKILL of the synth writer between its steps) leaves
the old or the new output, complete, once the next run has recovered; leftovers are cleaned."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localmim.utils import io
from localmim.utils.io import recover_dir, replace_dir, staging_dir
from tests.conftest import ROOT, cli_env


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _write(d: Path, tag: str, n: int = 5) -> dict[str, str]:
    for i in range(n):
        (d / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (d / f"sub{i % 2}" / f"f{i}.txt").write_text(f"{tag} {i}\n" * (i + 1))
    (d / f"only-{tag}.txt").write_text(tag)
    return _tree(d)


class Crash(BaseException):
    """Stands for the process dying: nothing in replace_dir may catch it."""


def _crash_at(monkeypatch, step: int) -> None:
    """Die before the ``step``-th rename (1: final aside, 2: new in, 3: old to its temp name) or, step 4, before
    the old one's files are deleted."""
    calls, real_replace = [], os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == step:
            raise Crash
        real_replace(src, dst)

    def rmtree(path, *a, **k):
        raise Crash

    monkeypatch.setattr(os, "replace", replace)
    if step == 4:
        monkeypatch.setattr(io.shutil, "rmtree", rmtree)


@pytest.mark.parametrize("step,survivor", [(1, "old"), (2, "old"), (3, "new"), (4, "new")])
def test_crash_in_each_window_leaves_old_or_new(tmp_path, monkeypatch, step, survivor):
    final, tmp = tmp_path / "out", tmp_path / ".out.staging"
    trees = {"old": _write(final, "old"), "new": _write(tmp, "new")}
    _crash_at(monkeypatch, step)
    with pytest.raises(Crash):
        replace_dir(tmp, final)
    monkeypatch.undo()
    if step == 2:  # the one window without `final`: the old output is complete under the aside name
        assert not final.exists() and _tree(tmp_path / ".out.old") == trees["old"]
    recover_dir(final)  # what the next run does first
    assert _tree(final) == trees[survivor]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if survivor == "new" else [".out.staging", "out"])
    # the next run's own swap then goes through, leaving nothing behind
    new2 = _write(staging_dir(final), "new2")
    replace_dir(tmp_path / ".out.staging", final)
    assert _tree(final) == new2 and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_first_swap_and_errors(tmp_path):
    new = _write(tmp_path / "t", "new")
    replace_dir(tmp_path / "t", tmp_path / "out")
    assert _tree(tmp_path / "out") == new and not (tmp_path / "t").exists()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'gone'}: no directory to move to {tmp_path / 'out'}"):
        replace_dir(tmp_path / "gone", tmp_path / "out")
    assert _tree(tmp_path / "out") == new


def test_staging_dir_is_fresh_and_recovers_an_interrupted_swap(tmp_path):
    old = _write(tmp_path / ".out.old", "old")  # a swap killed between its two renames
    (tmp_path / ".out.staging" / "stale").mkdir(parents=True)  # a killed writer's half-built output
    (tmp_path / ".out.old.tmp-123").mkdir()  # a deletion that was killed
    staging = staging_dir(tmp_path / "out")
    assert list(staging.iterdir()) == [] and _tree(tmp_path / "out") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.staging", "out"]


KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])  # this checkout
step = int(sys.argv[2])
import shutil
from localmim import synth
from tests.test_synth import TINY

# SIGKILL this process at a step of the swap of out/imagenet: before the step-th rename touching it (1: aside,
# 2: new in, 3: old to its temp name) or, step 4, half-way through deleting the old copy.
renames, real_replace, real_rmtree = [], os.replace, shutil.rmtree

def replace(src, dst):
    if Path(dst).name == "imagenet" or Path(dst).name.startswith(".imagenet.old"):
        renames.append(dst)
        if len(renames) == step:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

def rmtree(path, *a, **k):
    if step == 4 and Path(path).name.startswith(".imagenet.old.tmp-"):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *a, **k)

os.replace, shutil.rmtree = replace, rmtree
synth.generate_all(sys.argv[1], seed=1, **TINY)
"""


@pytest.fixture(scope="module")
def synth_trees(tmp_path_factory) -> dict:
    from localmim import synth
    from tests.test_synth import TINY

    root = tmp_path_factory.mktemp("synth")
    for seed in (0, 1):
        synth.generate_all(root / str(seed), seed=seed, **TINY)
    return {"root": root, **{s: {n: _tree(root / str(s) / n) for n in ("imagenet", "ade20k", "coco")}
                             for s in (0, 1)}}


@pytest.mark.parametrize("step,survivor", [(1, 0), (2, 0), (3, 1), (4, 1)])
def test_synth_killed_mid_swap_keeps_a_complete_dataset(tmp_path, synth_trees, step, survivor):
    """The real writer (``localmim synth``'s generate_all) over an older copy (seed 0), SIGKILLed at each step of
    its first swap: after the next run's recovery, ``imagenet`` is the old or the new copy, complete, and the
    datasets not yet swapped are the old ones; the next run then writes the new copy and leaves no leftovers."""
    from localmim import synth
    from tests.test_synth import TINY

    out = Path(shutil.copytree(synth_trees["root"] / "0", tmp_path / "raw"))
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    p = subprocess.run([sys.executable, str(script), str(out), str(step), str(ROOT)], env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    recover_dir(out / "imagenet")
    assert _tree(out / "imagenet") == synth_trees[survivor]["imagenet"]
    assert _tree(out / "ade20k") == synth_trees[0]["ade20k"] and _tree(out / "coco") == synth_trees[0]["coco"]
    synth.generate_all(out, seed=1, **TINY)  # the next run
    assert sorted(p.name for p in out.iterdir()) == ["ade20k", "coco", "imagenet"]
    assert all(_tree(out / n) == synth_trees[1][n] for n in ("imagenet", "ade20k", "coco"))

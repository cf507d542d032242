"""Shared test helpers: the repository root, a CLI runner, and a temp copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_TRACKING_URI_AT_START = os.environ.get("MLFLOW_TRACKING_URI")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running the real `localmim` CLI (and snakemake/dvc/torchrun) from this venv."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | str = ROOT, check: bool = False, **env: str) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [str(BIN / "localmim"), *args], cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=600
    )
    if check and p.returncode != 0:
        raise AssertionError(f"localmim {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def copy_repo(dst: Path) -> Path:
    """Copy the working tree (tracked + untracked-not-ignored files, as a fresh clone would have) to ``dst``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = ROOT / f.decode()
        if src.is_symlink():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst / f.decode())
        elif src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    return dst


@pytest.fixture(autouse=True)
def _tracking_uri_stays_in_its_test():
    """``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (so that subprocesses inherit it). Without
    this, a test that opened one store in-process sent every later test's CLI runs (``cli_env`` copies the
    environment) to that store instead of their own working copy's ``mlflow.db``. Restored to the value the
    session started with (a module fixture may have set it before a test's own setup)."""
    yield
    if _TRACKING_URI_AT_START is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = _TRACKING_URI_AT_START


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP barrier stalls on a shared, oversubscribed 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Kill-and-resume scaffolding: a training script run three times (killed by SIGKILL mid-run, resumed in the same
directories, and uninterrupted in fresh ones), so a test can compare the resumed run with the uninterrupted one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch

from tests.conftest import cli_env


def same_weights(a: dict, b: dict) -> bool:
    """Bit-identical state dicts (same keys, equal tensors)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_script(script: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], env=cli_env(**env), capture_output=True, text=True,
                          timeout=600)


def kill_then_resume(tmp_path: Path, source: str, args: Callable[[str], list[str]], kill_env: dict[str, str],
                     after_kill: Callable[[], None] | None = None) -> tuple[str, str]:
    """Write ``source`` to a script and run it with ``args("a")`` and ``kill_env`` (it must die by SIGKILL), then
    again with ``args("a")`` (it resumes and must succeed) and with ``args("b")`` (a clean run, must succeed).
    ``after_kill()`` runs between the kill and the resume. Returns the resumed and the clean run's stdout."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    killed = run_script(script, args("a"), **kill_env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    if after_kill is not None:
        after_kill()
    resumed = run_script(script, args("a"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean = run_script(script, args("b"))
    assert clean.returncode == 0, clean.stderr[-2000:]
    return resumed.stdout, clean.stdout

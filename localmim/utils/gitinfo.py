"""The git commit that produced an output (tagged on MLflow runs and stored in checkpoints)."""

from __future__ import annotations

import functools
import subprocess


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Current commit hash with a ``-dirty`` suffix for uncommitted changes; ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

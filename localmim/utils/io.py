"""Atomic output: every file is written under a temporary name and renamed into place.

An interrupted stage therefore never leaves a file that looks complete: either the old file (or nothing)
is there, or the complete new one. Temporary names start with ``.`` and end with ``.tmp-<pid>`` so
that globbing for outputs (``*.tar``, ``*.json``) never matches them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing via a temp file that is fsynced and renamed on success, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def clean_stale_tmp(directory: str | Path) -> int:
    """Remove temp files left by an interrupted earlier run; returns how many were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    n = 0
    for p in directory.glob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


# Files that stages leave next to their outputs but that are not data: the lineage record of the run that wrote
# a directory (localmim/tracking/lineage.py; `.dvcignore` keeps it out of DVC's hashes) and dotfiles (temporaries,
# Snakemake's `.snakemake_timestamp`). Fingerprints of a data directory (checkpoint identity, digests) skip them.
LINEAGE_GLOB = "lineage.*.json"


def is_run_metadata(path: str | Path) -> bool:
    name = Path(path).name
    return name.startswith(".") or (name.startswith("lineage.") and name.endswith(".json"))

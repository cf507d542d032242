"""Atomic output: every file is written under a temporary name and renamed into place.

An interrupted stage therefore never leaves a file that looks complete: either the old file (or nothing)
is there, or the complete new one. Temporary names start with ``.`` and end with ``.tmp-<pid>`` so
that globbing for outputs (``*.tar``, ``*.json``) never matches them.

A whole output directory is built under a staging name and swapped in by :func:`replace_dir` (the old directory
is kept until the new one is in place; see there for the crash windows and their recovery).
"""

from __future__ import annotations

import contextlib
import glob
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


def staging_path(final: str | Path) -> Path:
    """``.<name>.staging`` next to ``final``: where :func:`staging_dir` builds its replacement (one name, so that
    every rank of a run finds it and the next run removes what a killed one left)."""
    final = Path(final)
    return final.with_name(f".{final.name}.staging")


def staging_dir(final: str | Path) -> Path:
    """A fresh, empty :func:`staging_path` of ``final`` to build its replacement in; what an earlier run left there
    is removed, and an interrupted swap of ``final`` recovered first (:func:`recover_dir`)."""
    recover_dir(final)
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")  # not a ``.tmp-`` name: clean_stale_tmp must never delete it


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (best effort: some filesystems refuse to open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(path: Path) -> None:
    """Delete ``path`` (a directory or a file) by renaming it to a ``.tmp-<pid>`` name first: a deletion that is
    interrupted leaves a temp name (removed by the next run), never a half-deleted directory under a name that
    :func:`recover_dir` would restore."""
    trash = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    os.replace(path, trash)
    _remove(trash)


def recover_dir(final: str | Path) -> None:
    """Finish what an interrupted :func:`replace_dir` of ``final`` left: the old output set aside
    (``.<name>.old``) is renamed back when ``final`` is missing (the crash came before the new one was moved in),
    deleted when ``final`` is there (the new one is complete); half-deleted leftovers (``.<name>.old.tmp-*``) are
    removed."""
    final = Path(final)
    aside = _aside(final)
    for trash in final.parent.glob(f"{glob.escape(aside.name)}.tmp-*") if final.parent.is_dir() else []:
        _remove(trash)
    if aside.exists() or aside.is_symlink():
        if final.exists() or final.is_symlink():
            _discard(aside)
        else:
            os.replace(aside, final)
            _fsync_dir(final.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move the complete directory ``tmp`` to ``final``, replacing what is there, keeping the old output until the
    new one is in place: (1) ``final`` -> ``.<name>.old``, (2) ``tmp`` -> ``final``, (3) the old one deleted
    (renamed to a temp name, then removed). ``tmp`` must be on the same filesystem (next to ``final``).

    Crash windows: before (1) ``final`` is the old output; between (1) and (2) the old output is complete under
    ``.<name>.old`` and the next :func:`replace_dir` / :func:`staging_dir` / :func:`recover_dir` of ``final``
    renames it back; after (2) ``final`` is the new output and the leftovers are deleted by the next run.
    """
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir():
        raise FileNotFoundError(f"{tmp}: no directory to move to {final}")
    recover_dir(final)
    aside = _aside(final)
    if final.exists() or final.is_symlink():
        os.replace(final, aside)  # (1)
    os.replace(tmp, final)  # (2)
    _fsync_dir(final.parent)
    if aside.exists() or aside.is_symlink():
        _discard(aside)  # (3)
    return final


# Files that stages leave next to their outputs but that are not data: the lineage record of the run that wrote
# a directory (localmim/tracking/lineage.py; `.dvcignore` keeps it out of DVC's hashes) and dotfiles (temporaries,
# Snakemake's `.snakemake_timestamp`). Fingerprints of a data directory (checkpoint identity, digests) skip them.
LINEAGE_GLOB = "lineage.*.json"


def is_run_metadata(path: str | Path) -> bool:
    name = Path(path).name
    return name.startswith(".") or (name.startswith("lineage.") and name.endswith(".json"))

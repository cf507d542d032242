"""Image *files* read directly (ADE20K, COCO, the benchmarks' ImageFolder path): one check, one reader, one rule.

Shards are verified when they are written (:mod:`localmim.data.shards.write`: every image fully decoded, bad ones
listed). Whatever reads image files instead goes through this module, so a damaged file is treated the same everywhere:

* :func:`check_image_file` decodes one file completely with the shard writer's verifier
  (:func:`localmim.data.raw.imagefolder.prepare_image`; an RGB JPEG in draft mode, which still reads every
  entropy-coded segment, so truncation is caught at a fraction of a full decode's cost). Its reasons are the
  shard writer's: ``zero-byte file``, ``truncated JPEG: ...``, ``not an image: cannot identify image file``.
  A file whose content is another format than its extension says (a PNG named ``.jpg``) decodes by content, so
  it is *usable*; it gets a ``note`` naming it. ``kind="label"`` decodes a label map as stored and lists its
  pixel values.
* :func:`check_image_files` runs it over many files in worker processes, with a cache keyed by
  (absolute path, size, mtime) in a JSON file: a rerun or a resume decodes only new or changed files.
* :func:`read_image` is the one reader at load time: a decode error raises :class:`ImageFileError` naming the
  file and (in the shard writer's words) what is wrong.
* :class:`LoadSkips` is the rule for a file that passed the check and fails to load (damaged since): ``skip``
  appends a record (one JSON line; DataLoader workers and ranks share the file) and the dataset substitutes
  another sample (training: the batch keeps its size, so every rank takes every step) or leaves the sample out
  (evaluation); ``fail`` raises, and :func:`one_line` turns the DataLoader's re-raised error into one line.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from localmim.data.raw.imagefolder import BadImageError, prepare_image, sniff_format
from localmim.utils.io import atomic_write_text

T = TypeVar("T")
CACHE_FORMAT = 1  # bump when what a check decides changes: older caches are then ignored
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit, as the shard writer's default
_EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP"}


class ImageFileError(BadImageError):
    """An image file cannot be decoded. ``str(e)`` is ``"<path>: <reason>"``; ``path`` and ``reason`` apart.
    One positional argument suffices to rebuild it (the DataLoader re-raises a worker's error that way)."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason

    @classmethod
    def of(cls, path: str | Path, reason: str) -> ImageFileError:
        return cls(f"{path}: {reason}", str(path), reason)


@dataclass(frozen=True)
class FileCheck:
    """What :func:`check_image_file` found; ``reason`` is None for a usable file."""

    size: int  # bytes, with mtime_ns the cache key
    mtime_ns: int
    kind: str = "image"  # "image" (decoded to RGB at load time) | "label" (a label map, read as stored)
    width: int = 0
    height: int = 0
    reason: str | None = None
    note: str | None = None  # usable, but named in the report (e.g. PNG content under a .jpg name)
    ndim: int = 0  # label maps: 2 = single channel
    values: tuple[int, ...] = ()  # label maps: the pixel values present


def _decode_reason(data: bytes, kind: str) -> tuple[str | None, tuple[int, int], Any]:
    """(reason or None, (width, height), the label map for ``kind='label'``): one full decode."""
    if kind == "image":
        res = prepare_image(data, max_side=0, jpeg_quality=95, max_pixels=MAX_PIXELS, encode=False)
        return res.skip, res.size, None
    try:
        arr = np.asarray(_open_full(data, None))
    except ImageFileError as e:
        return e.reason, (0, 0), None
    return None, (arr.shape[1], arr.shape[0]) if arr.ndim >= 2 else (0, 0), arr


def _format_note(path: str, data: bytes) -> str | None:
    want, got = _EXT_FORMAT.get(Path(path).suffix.lower()), sniff_format(data)
    if want and got != "image" and got != want:
        return f"{got} content under a {Path(path).suffix} name (decoded by content; used)"
    return None


def check_image_file(path: str | Path, kind: str = "image") -> FileCheck:
    """Decode ``path`` completely (see the module docstring). Never raises for a bad file: the reason says why."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        return FileCheck(0, 0, kind, reason=f"missing file ({e.strerror or type(e).__name__})")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return FileCheck(st.st_size, st.st_mtime_ns, kind, reason=f"unreadable file: {e.strerror or type(e).__name__}")
    reason, (w, h), arr = _decode_reason(data, kind)
    ndim, values = 0, ()
    if arr is not None:
        ndim = arr.ndim
        if arr.ndim == 2:
            counts = np.bincount(arr.ravel(), minlength=256) if arr.dtype == np.uint8 else None
            values = tuple(np.flatnonzero(counts).tolist()) if counts is not None else tuple(np.unique(arr).tolist())
    note = _format_note(path, data) if reason is None else None
    return FileCheck(st.st_size, st.st_mtime_ns, kind, w, h, reason, note, ndim, values)


def _check_task(task: tuple[str, str]) -> FileCheck:
    return check_image_file(*task)


# ----------------------------------------------------------------------------------------------------- cache


def _read_cache(path: Path | None) -> dict[str, FileCheck]:
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != CACHE_FORMAT or doc.get("max_pixels") != MAX_PIXELS:
            return {}
        return {p: FileCheck(**{**e, "values": tuple(e.get("values", ()))}) for p, e in doc["files"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no cache, or an unreadable one: everything is checked again


def _write_cache(path: Path | None, entries: dict[str, FileCheck]) -> None:
    if path is None:
        return
    doc = {"format": CACHE_FORMAT, "max_pixels": MAX_PIXELS, "files": {p: asdict(c) for p, c in entries.items()}}
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))


def _fresh(entry: FileCheck | None, path: str, kind: str) -> FileCheck | None:
    """The cached entry when ``path`` still has its size and mtime (same kind of check), else None."""
    if entry is None or entry.kind != kind:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return entry if (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns) else None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_image_files(tasks: Iterable[tuple[str | Path, str]], *, cache: str | Path | None = None, workers: int = 0,
                      progress: bool = False, desc: str = "check images", save_every_s: float = 60.0
                      ) -> dict[str, FileCheck]:  # fmt: skip
    """:func:`check_image_file` of every ``(path, kind)``, keyed by ``str(path)``.

    Files whose (size, mtime) match the ``cache`` file are not decoded again; the others are decoded in
    ``workers`` processes (0 = every CPU this process may use; a short list is checked in this process). The
    cache is rewritten (atomically) every ``save_every_s`` seconds and at the end, so an interrupted check
    resumes where it stopped. Entries of files not asked about this time are kept.
    """
    from tqdm import tqdm

    from localmim.utils.parallel import ordered_map

    cache = Path(cache) if cache is not None else None
    entries = _read_cache(cache)
    tasks = [(str(p), kind) for p, kind in tasks]
    out: dict[str, FileCheck] = {}
    todo = []
    for p, kind in tasks:
        hit = _fresh(entries.get(os.path.abspath(p)), p, kind)
        if hit is not None:
            out[p] = hit
        else:
            todo.append((p, kind))
    workers = workers or available_cpus()
    workers = 1 if len(todo) < 64 else min(workers, len(todo) // 32)
    last = time.monotonic()
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not (progress and todo), file=sys.stderr,
              mininterval=1.0, dynamic_ncols=True) as bar:  # fmt: skip
        for (p, _), res in zip(todo, ordered_map(_check_task, todo, workers, chunksize=16), strict=True):
            out[p] = entries[os.path.abspath(p)] = res
            bar.update(1)
            if cache is not None and time.monotonic() - last > save_every_s:
                _write_cache(cache, entries)
                last = time.monotonic()
    if todo:
        _write_cache(cache, entries)
    return out


# ---------------------------------------------------------------------------------------------- reading


def _open_full(data: bytes, mode: str | None) -> Image.Image:
    """Decoded image from bytes (converted to ``mode`` unless None); ImageFileError (reason only) otherwise."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.convert(mode) if mode is not None and im.mode != mode else im
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        if not data:
            reason = "zero-byte file"
        else:
            reason = prepare_image(data, max_side=0, jpeg_quality=95, max_pixels=MAX_PIXELS, encode=False).skip
        raise ImageFileError("", "", reason or f"{type(e).__name__}: {e}") from None


def read_image(path: str | Path, mode: str | None = "RGB") -> Image.Image:
    """The one reader of image files outside shards: the fully decoded image, converted to ``mode`` (None: as
    stored, e.g. a label map). Raises :class:`ImageFileError` naming the file and, in the shard writer's words
    (the same function decides them), what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageFileError.of(path, f"unreadable file: {e.strerror or type(e).__name__}") from None
    try:
        return _open_full(data, mode)
    except ImageFileError as e:
        raise ImageFileError.of(path, e.reason) from None


# ------------------------------------------------------------------------------------- load-time failures


_FAILED: dict[str, tuple[int, set[str]]] = {}  # per process: log -> (its size when read, recorded files)


@dataclass(frozen=True)
class LoadSkips:
    """The rule for a file that fails to load after passing the check (see the module docstring).

    ``log``: the JSON-lines record (None: no record possible, so every failure raises); ``split`` tags records.
    """

    log: str | None = None
    on_bad: str = "fail"
    split: str = ""

    def __post_init__(self):
        if self.on_bad not in ("skip", "fail"):
            raise ValueError(f"on_bad must be skip|fail, got {self.on_bad!r}")

    def handle(self, err: ImageFileError, **extra: Any) -> None:
        """Record ``err`` (``skip``), or raise it (``fail``, or no log)."""
        if self.on_bad == "fail" or self.log is None:
            raise err
        rec = {"split": self.split, "file": err.path, "reason": f"failed to load: {err.reason}", **extra}
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one O_APPEND write: lines from several processes never interleave
        finally:
            os.close(fd)
        print(f"localmim: skipped {err.path} ({self.split}): {err.reason}", file=sys.stderr, flush=True)

    def failed(self, file: str) -> bool:
        """Whether ``file`` has a record (the log is re-read only when it has grown)."""
        if self.log is None or not os.path.exists(self.log):
            return False
        size = os.path.getsize(self.log)
        known = _FAILED.get(self.log)
        if known is None or known[0] != size:
            known = _FAILED[self.log] = (size, {r["file"] for r in self.records()})
        return file in known[1]

    def records(self) -> list[dict[str, Any]]:
        """This split's recorded failures, one per file (the first), sorted by file."""
        if self.log is None or not os.path.exists(self.log):
            return []
        seen: dict[str, dict[str, Any]] = {}
        for line in Path(self.log).read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("split") == self.split:
                seen.setdefault(rec["file"], rec)
        return [seen[f] for f in sorted(seen)]


def load_skip_log(directory: str | Path, identity: Any) -> str:
    """Where a run's load-time records go: ``directory/load-skips-<hash of identity>.jsonl``. ``identity`` should
    fix the run and its files (params, and each used file's size and mtime), so that a resumed run finds its
    records again and a changed dataset or run starts a new file."""
    import hashlib

    Path(directory).mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return str(Path(directory) / f"load-skips-{digest}.jsonl")


def file_stats(paths: Iterable[str | Path]) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of each file (0, 0 for one that is gone): part of a run's identity."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), 0, 0))
    return out


def first_loadable(load: Callable[[int], T], index: int, n: int, skips: LoadSkips) -> tuple[T, int]:
    """``(load(i), i)`` for the first of ``index, index + 1, ... (mod n)`` that loads; each failure goes to
    ``skips`` (recorded, or raised under ``fail``). A pure function of the data, so resume stays exact."""
    for k in range(n):
        i = (index + k) % n
        try:
            return load(i), i
        except ImageFileError as e:
            skips.handle(e)
    raise ImageFileError.of(f"all {n} samples", "none of them loads")


class Loadable(torch.utils.data.Dataset):
    """``ds`` under the load-time rule ``skips``: a sample whose image no longer decodes is recorded (or raises)
    and replaced by the next loadable one (``substitute``: training) or returned as None (evaluation: the collate
    function drops it). In evaluation a file recorded once stays out for the rest of the run, so whatever scores the
    predictions (e.g. :class:`localmim.data.dense.coco.ScoredGroundTruth`) and the predictions cover the same images."""

    def __init__(self, ds, files: list[str], skips: LoadSkips, substitute: bool):
        self.ds, self.files, self.skips, self.substitute = ds, files, skips, substitute

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self.ds):
            raise IndexError(i)
        if self.substitute:
            return first_loadable(self.ds.__getitem__, i, len(self.ds), self.skips)[0]
        if self.skips.failed(self.files[i]):
            return None
        try:
            return self.ds[i]
        except ImageFileError as e:
            self.skips.handle(e)
            return None


def one_line(err: BaseException) -> str:
    """The last line of an error re-raised by a DataLoader (it embeds the worker's traceback), without the
    exception's module path: ``"<path>: <reason>"``."""
    last = (str(err).strip().splitlines() or [""])[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == type(err).__name__ else last


__all__ = ["FileCheck", "ImageFileError", "LoadSkips", "Loadable", "available_cpus", "check_image_file",
           "check_image_files", "file_stats", "first_loadable", "load_skip_log", "one_line", "read_image"]

"""ImageFolder -> WebDataset tar shards (``localmim shard``); read them with :mod:`localmim.data.shards.stream`.

Output of :func:`write_shards` in ``out/``:

* ``<split>-000000.tar``, ... : one sample per source image, members ``<key>.cls`` (class index, ASCII),
  ``<key>.jpg`` (the original bytes when the file already is a decodable RGB JPEG that needs no downscale;
  otherwise decoded, converted to RGB, optionally downscaled and re-encoded) and ``<key>.json`` (class name,
  class index, original relative path, stored width/height, re-encode reason if any). Keys are
  ``<split>-<position in the shuffled order>``. Tar members have fixed mtime/uid/gid/uname/gname/mode, so the
  same input and options give byte-identical shards.
* ``_info.json``: timm's dataset info (``splits.<split>.{num_samples, filenames, shard_lengths}``), so that timm
  reads the shards with its ``wds/`` reader::

      timm.data.create_dataset("wds/localmim", root="data/shards/train", split="train", is_training=False)

  yields ``(PIL RGB image, class index)`` for every sample (``is_training=True`` for shuffled, repeating reads).
* ``<split>.json``: the manifest, written last (its presence means the split is complete): classes
  (sorted directory names -> index, and per-class counts), per-shard ``{name, num_samples, bytes, sha256}``,
  totals, options, re-encode counts, and every skipped input with its reason.

Every file is written under a temporary name (``.name.tmp-<pid>``) and renamed into place when complete;
the manifest comes last, so a killed run never leaves a split that looks complete. A re-run removes stale
temp files and this split's previous outputs first.

Memory does not grow with the dataset's image bytes: images flow through a bounded window of in-flight work
(a pool of decode/verify workers, results consumed in input order) straight into the current tar. Only the
list of relative paths (and of skipped files) is held, like torchvision's ``ImageFolder``. The workers also
serialize each sample's tar members (:func:`localmim.data.shards.tario.tar_members`), so the writer only appends bytes
(:class:`localmim.data.shards.tario.ShardSink`); see benchmarks/RESULTS.md for the comparison with webdataset's
``TarWriter``.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localmim.data.raw.imagefolder import BadImageError, Inventory, Prepared, prepare_image, scan_image_folder
from localmim.data.shards.manifest import MANIFEST_FORMAT
from localmim.data.shards.tario import ShardSink, tar_members
from localmim.utils.io import atomic_write_json, clean_stale_tmp
from localmim.utils.parallel import ordered_map

__all__ = ["BadImageError", "ShardOptions", "scan_image_folder", "write_shards"]


@dataclass(frozen=True)
class ShardOptions:
    """What :func:`write_shards` does; recorded in the manifest."""

    max_samples_per_shard: int = 100
    max_shard_bytes: int = 1 << 30  # a single sample larger than this still gets a shard of its own
    max_side: int = 0  # 0 = keep; >0 = downscale so the long side is at most this (re-encodes those images)
    seed: int = 0  # shuffle of samples across shards
    workers: int = 2
    on_bad: str = "skip"  # "skip" | "fail"
    jpeg_quality: int = 95  # for re-encoded images
    max_pixels: int = 89_478_485  # decompression-bomb limit on width*height (PIL's default MAX_IMAGE_PIXELS)

    def __post_init__(self):
        if self.on_bad not in ("skip", "fail"):
            raise ValueError(f"on_bad={self.on_bad!r}: expected 'skip' or 'fail'")
        for name in ("max_samples_per_shard", "workers", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.max_side < 0:
            raise ValueError(f"max_side={self.max_side}: must be >= 0 (0 keeps the original size)")


@dataclass(frozen=True)
class _Task:
    path: str
    key: str
    meta: dict[str, Any]  # class, cls, path
    max_side: int
    jpeg_quality: int
    max_pixels: int


def _prepare_file(task: _Task) -> Prepared:
    """Worker: read, verify/convert one file and serialize its sample (tar members) ready to append."""
    try:
        data = Path(task.path).read_bytes()
    except OSError as e:
        return Prepared(skip=f"unreadable file: {e.strerror or type(e).__name__}")
    res = prepare_image(data, max_side=task.max_side, jpeg_quality=task.jpeg_quality, max_pixels=task.max_pixels)
    if res.skip is None:
        meta = {**task.meta, "width": res.size[0], "height": res.size[1]}
        if res.reencoded:
            meta["reencoded"] = res.reencoded
        fields = {
            "cls": str(meta["cls"]).encode(),
            "jpg": res.jpg,
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
        }
        res.members = tar_members(task.key, fields)
        res.jpg = None  # now inside ``members``; don't ship it twice
    return res


# ---------------------------------------------------------------------------------------------------- writing


def _remove_previous(out: Path, split: str) -> None:
    """Forget this split's earlier outputs: manifest first (the split stops looking complete), then info, shards."""
    clean_stale_tmp(out)
    (out / f"{split}.json").unlink(missing_ok=True)
    info = _read_info(out)
    if split in info.get("splits", {}):
        del info["splits"][split]
        atomic_write_json(out / "_info.json", info)
    for p in out.glob(f"{split}-*.tar"):
        p.unlink()


def _read_info(out: Path) -> dict[str, Any]:
    p = out / "_info.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _write_info(out: Path, split: str, shards: list[dict[str, Any]], num_classes: int) -> None:
    info = _read_info(out)
    info.update(name="localmim", num_classes=num_classes)
    info.setdefault("splits", {})[split] = {
        "name": split,
        "num_samples": sum(s["num_samples"] for s in shards),
        "filenames": [s["name"] for s in shards],
        "shard_lengths": [s["num_samples"] for s in shards],
    }
    atomic_write_json(out / "_info.json", info)


@dataclass
class _Packed:
    """What the packing loop produced: finished shards, skipped files, re-encode and per-class counts."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    reencoded: Counter[str] = field(default_factory=Counter)
    class_counts: Counter[int] = field(default_factory=Counter)


def _tasks(inv: Inventory, order: list[int], split: str, opts: ShardOptions) -> Iterator[_Task]:
    for n, i in enumerate(order):
        rel, cls = inv.files[i]
        meta = {"class": inv.classes[cls], "cls": cls, "path": rel}
        yield _Task(str(inv.root / rel), f"{split}-{n:08d}", meta, opts.max_side, opts.jpeg_quality, opts.max_pixels)


def _pack(inv: Inventory, order: list[int], out: Path, split: str, opts: ShardOptions, bar) -> _Packed:
    """Append the prepared samples, in ``order``, to shards that roll over at the count / byte limits."""
    acc = _Packed()
    with ShardSink(out, split, opts.max_samples_per_shard, opts.max_shard_bytes) as sink:
        for pos, res in zip(order, ordered_map(_prepare_file, _tasks(inv, order, split, opts), opts.workers),
                            strict=True):  # fmt: skip
            bar.update(1)
            rel, cls = inv.files[pos]
            if res.skip is not None:
                if opts.on_bad == "fail":
                    raise BadImageError(f"{inv.root / rel}: {res.skip}")
                acc.skipped.append({"path": rel, "reason": res.skip})
                bar.set_postfix(skipped=len(acc.skipped), refresh=False)
                continue
            sink.write(res.members)
            acc.class_counts[cls] += 1
            if res.reencoded:
                acc.reencoded[res.reencoded] += 1
    acc.shards = sink.shards
    return acc


def _manifest(inv: Inventory, acc: _Packed, src: str | Path, split: str, opts: ShardOptions,
              warnings: list[str]) -> dict[str, Any]:  # fmt: skip
    return {
        "format": MANIFEST_FORMAT,
        "split": split,
        "source": str(src),
        "classes": {name: i for i, name in enumerate(inv.classes)},
        "class_counts": {name: acc.class_counts[i] for i, name in enumerate(inv.classes)},
        "num_found": len(inv.files),
        "num_samples": sum(s["num_samples"] for s in acc.shards),
        "num_skipped": len(acc.skipped),
        "num_ignored": len(inv.ignored),
        "num_shards": len(acc.shards),
        "total_bytes": sum(s["bytes"] for s in acc.shards),
        "shards": acc.shards,
        "reencoded": dict(sorted(acc.reencoded.items())),
        "options": asdict(opts),
        "skipped": acc.skipped,
        "ignored": inv.ignored,
        "warnings": warnings,
    }


def write_shards(
    src: str | Path | Inventory,
    out: str | Path,
    split: str,
    opts: ShardOptions,
    *,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Shard the ImageFolder tree ``src`` into ``out/<split>-NNNNNN.tar`` (see module docstring).

    Args:
        src: ImageFolder root (one sub-directory per class), or an :class:`Inventory` already listed (e.g. the
            flat ImageNet val folder of :mod:`localmim.data.raw.imagenet_val`).
        out: output directory (shared by splits; each split owns ``<split>*`` files and its ``_info.json`` entry).
        split: split name, used in file names and sample keys.
        opts: sharding options.
        progress: show a tqdm bar (images/s) on stderr.
        warn: called with each warning line (empty class, skipped files).

    Returns:
        The manifest (also written to ``out/<split>.json``).

    Raises:
        BadImageError: with ``opts.on_bad == "fail"``, at the first unusable file (nothing complete is left).
        ValueError: ``out`` lies inside ``src``.
    """
    from tqdm import tqdm

    inv = src if isinstance(src, Inventory) else scan_image_folder(src)
    src = inv.root
    out = Path(out)
    if out.resolve().is_relative_to(inv.root.resolve()):
        raise ValueError(f"output {out} is inside the ImageFolder {inv.root}: it would be read as a class")
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out, split)
    order = list(range(len(inv.files)))
    random.Random(opts.seed).shuffle(order)
    with tqdm(total=len(order), unit="img", desc=f"shard {split}", file=sys.stderr, disable=not progress,
              mininterval=0.5, dynamic_ncols=True) as bar:  # fmt: skip
        acc = _pack(inv, order, out, split, opts, bar)

    written = sum(s["num_samples"] for s in acc.shards)
    if len(inv.files) != written + len(acc.skipped):  # the invariant the manifest promises
        raise AssertionError(f"found {len(inv.files)} != written {written} + skipped {len(acc.skipped)}")
    warnings = [f"class {c!r} (index {i}) has no images" for i, c in enumerate(inv.classes) if not acc.class_counts[i]]
    if acc.skipped:
        warnings.append(f"skipped {len(acc.skipped)} of {len(inv.files)} files (reasons in {out / (split + '.json')})")
    for w in warnings:
        if warn is not None:
            warn(w)
    manifest = _manifest(inv, acc, src, split, opts, warnings)
    _write_info(out, split, acc.shards, len(inv.classes))
    atomic_write_json(out / f"{split}.json", manifest)  # last: its presence marks the split complete
    return manifest

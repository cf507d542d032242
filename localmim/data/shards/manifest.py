"""Shard directories and their manifests: the one place that knows which tars a directory holds.

A split written by ``localmim shard`` has ``<split>.json`` (written last: its presence marks the split complete)
with a ``shards`` list of ``{name, num_samples, bytes, sha256}``; view shards (``localmim targets``) have a
``views.json`` at the top and a ``view-KK.json`` in each view directory. A directory without a manifest is read
as every ``*.tar`` in it, counted by scanning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmim.data.shards.tario import count_samples_in

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # sample members holding the image, in order of preference
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder
MANIFEST_FORMAT = "localmim-wds/1"
VIEWS_MANIFEST = "views.json"


@dataclass(frozen=True)
class ShardSet:
    """Tar shards of one directory (absolute paths, manifest order) with their sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _manifests(directory: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for p in sorted(directory.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("shards"), list):
            found[p.name] = data
    return found


def read_manifest(directory: str | Path, split: str | None = None) -> dict[str, Any] | None:
    """The shard manifest of ``directory``.

    With ``split``: ``<split>.json``, FileNotFoundError when that split was never finished. Without: the only
    manifest of the directory (``train.json`` when it holds several splits), None when there is none.

    Raises:
        ValueError: several manifests and none is ``train.json``.
    """
    directory = Path(directory)
    if split is not None:
        p = directory / f"{split}.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no manifest, the {split!r} shards are missing or incomplete")
        return json.loads(p.read_text())
    found = _manifests(directory)
    if len(found) > 1 and "train.json" not in found:
        raise ValueError(f"{directory}: several shard manifests {sorted(found)}; expected one or train.json")
    return found.get("train.json") or next(iter(found.values()), None)


def shard_set(directory: str | Path, split: str | None = None) -> ShardSet:
    """The shards of ``directory`` with their counts, from its manifest (see :func:`read_manifest`), else every
    ``*.tar`` counted by scanning.

    Raises:
        ValueError: no shards, several manifests and none is ``train.json``, or a listed shard is missing.
    """
    directory = Path(directory).resolve()
    man = read_manifest(directory, split)
    if man is not None:
        urls = [directory / Path(s["name"]).name for s in man["shards"]]
        missing = [u.name for u in urls if not u.is_file()]
        if missing:
            raise ValueError(f"{directory}: manifest lists missing shards {missing}")
        return ShardSet(tuple(map(str, urls)), tuple(int(s["num_samples"]) for s in man["shards"]))
    urls = sorted(directory.glob("*.tar"))
    if not urls:
        raise ValueError(f"{directory}: no *.tar shards found")
    return ShardSet(tuple(map(str, urls)), tuple(count_samples_in(u) for u in urls))


def shard_paths(directory: str | Path, split: str) -> list[str]:
    """Absolute paths of a complete split's shards, in manifest order."""
    return list(shard_set(directory, split).urls)


def count_samples(directory: str | Path) -> int:
    """Number of samples: from the manifest when present, else by scanning the tars."""
    return shard_set(directory).total


def num_classes_of(directory: str | Path) -> int | None:
    """Class count from the manifest's ``classes`` (list, dict or int), None when unknown."""
    man = read_manifest(directory)
    if man is None or "classes" not in man:
        return None
    classes = man["classes"]
    return len(classes) if isinstance(classes, list | dict) else int(classes)


def read_views_manifest(views_dir: str | Path) -> dict[str, Any]:
    """``views.json`` of a view-shard directory; ValueError when it is missing."""
    path = Path(views_dir) / VIEWS_MANIFEST
    if not path.is_file():
        raise ValueError(f"{views_dir}: no {VIEWS_MANIFEST}; run `localmim targets` first")
    return json.loads(path.read_text())

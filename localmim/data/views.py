"""View shards: K fixed augmented views per training image with their multi-scale targets, precomputed once.

Layout of the output directory::

    views.json                 # manifest: K, geometry, target, dtype, per-view counts/bytes/sha256, source
    view-00/views-000000.tar   # view 0 of every image (pretraining epoch e reads view e mod K)
    view-00/view-00.json       # shard manifest of view 0 ({name, num_samples, bytes, sha256} per shard)
    view-01/...

Each sample (same ``__key__`` as the source image) holds ``png`` (the uint8 view, lossless), ``json`` (crop
params) and, for HOG targets, ``hog.npy``: the un-normalised finest-cell histograms ``[3*nb, S/c, S/c]`` in
fp16 or fp32. Every coarser scale is an exact mean of them followed by the L2 normalisation
(:func:`localmim.targets.hog.hog_from_pooled`), so one map serves all taps. Pixel targets store nothing.

View ``k`` of image ``key`` is the online augmentation of epoch ``k`` (same RNG, :func:`sample_rng`), so with
``targets.seed == pretrain.seed`` view mode replays the online crops and flips of the first K epochs. The flip
is part of the view: a stored HOG cannot be flipped afterwards (method §13.19).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localmim.data.pretrain import decode_image, random_view, sample_rng
from localmim.data.shards.manifest import VIEWS_MANIFEST, shard_set
from localmim.data.shards.stream import raw_samples
from localmim.data.shards.tario import ShardSink, tar_members
from localmim.targets.hog import hog_from_pooled, pixel_histograms, pool_cells, to_tokens
from localmim.utils.io import replace_dir, staging_dir

TAR_OVERHEAD = 3 * 1024  # per sample: three 512-byte tar headers plus padding, rounded up


@dataclass(frozen=True)
class ViewSpec:
    """What to store: K views of side ``input_size`` and, for HOG, histograms at ``finest_cell``."""

    views: int
    seed: int
    input_size: int
    target: str  # "hog" | "pixel"
    hog_nbins: int
    cells: tuple[int, ...]  # the model's per-tap target cells
    dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.target not in ("hog", "pixel"):
            raise ValueError(f"target must be hog or pixel, got {self.target!r}")
        if self.dtype not in ("fp16", "fp32"):
            raise ValueError(f"dtype must be fp16 or fp32, got {self.dtype!r}")
        if self.input_size % self.finest_cell:
            raise ValueError(f"finest cell {self.finest_cell} does not divide input_size {self.input_size}")

    @property
    def finest_cell(self) -> int:
        return min(self.cells)

    @property
    def hog_shape(self) -> tuple[int, int, int]:
        g = self.input_size // self.finest_cell
        return 3 * self.hog_nbins, g, g

    @property
    def hog_bytes(self) -> int:
        return int(np.prod(self.hog_shape)) * (2 if self.dtype == "fp16" else 4) if self.target == "hog" else 0


def spec_from_model(model: torch.nn.Module, views: int, seed: int, dtype: str) -> ViewSpec:
    """The :class:`ViewSpec` of a LocalMIM/MAE model (its img size, target, nb and per-tap cells).

    Raises:
        ValueError: HOG with a Sobel bias (the bias belongs to the model, so targets cannot be precomputed).
    """
    if model.target == "hog" and getattr(model, "hog_biases", None) is not None:
        raise ValueError("HOG with hog_bias cannot be precomputed (the bias lives in the model); use data: online")
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    return ViewSpec(views, seed, int(size), model.target, int(model.hog_nbins), tuple(model.target_cells), dtype)


@torch.no_grad()
def finest_histograms(views: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """Un-normalised finest-cell HOG of uint8 views ``[K, 3, S, S]`` -> float32 ``[K, 3*nb, S/c, S/c]``."""
    return pool_cells(pixel_histograms(views, spec.hog_nbins), spec.finest_cell)


@torch.no_grad()
def targets_from_finest(finest: torch.Tensor, nbins: int, cells: list[int] | tuple[int, ...]) -> list[torch.Tensor]:
    """Per-tap targets ``[B, M_k, 3*nb]`` (float32) from stored finest-cell histograms ``[B, 3*nb, h, w]``."""
    maps = hog_from_pooled(finest, nbins, min(cells), list(cells))  # each [B, 3*nb, S/c_k, S/c_k]
    return [to_tokens(m) for m in maps]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _png_bytes(view: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(view.permute(1, 2, 0).numpy()).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_views(sample: dict[str, Any], spec: ViewSpec) -> list[dict[str, Any]]:
    """The K view samples of one raw sample (``__key__`` + image bytes)."""
    key = sample["__key__"]
    img = decode_image(sample)
    made = [random_view(img, spec.input_size, sample_rng(spec.seed, k, key)) for k in range(spec.views)]
    out = [{"__key__": key, "png": _png_bytes(v), "json": json.dumps(p).encode()} for v, p in made]
    if spec.target == "hog":
        hist = finest_histograms(torch.stack([v for v, _ in made]), spec)  # [K, 3*nb, S/c, S/c]
        hist = hist.numpy().astype(np.float16 if spec.dtype == "fp16" else np.float32)
        for k, s in enumerate(out):
            s["hog.npy"] = _npy_bytes(hist[k])
    return out


def _worker_init() -> None:
    torch.set_num_threads(1)


def _make_views_job(args: tuple[dict[str, Any], ViewSpec]) -> list[dict[str, Any]]:
    return make_views(*args)


def projected_bytes(samples: list[dict[str, Any]], spec: ViewSpec, num_samples: int) -> int:
    """Projected size on disk from a few measured samples: ``N × K × (png + hog + json + tar overhead)``."""
    per_view = [len(s["png"]) + len(s["json"]) + spec.hog_bytes + 128 + TAR_OVERHEAD for x in samples for s in x]
    return int(np.mean(per_view) * num_samples * spec.views) if per_view else 0


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"


def write_views(
    src: str | Path,
    out: str | Path,
    spec: ViewSpec,
    *,
    max_samples_per_shard: int = 1000,
    workers: int = 1,
    log: Callable[[str], None] = print,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the view shards of the train shards in ``src`` to ``out`` (atomically: staged, then renamed).

    Returns:
        the manifest written to ``out/views.json``.
    """
    src, out = Path(src), Path(out)
    source = shard_set(src)
    n = source.total
    stage = staging_dir(out)  # what a killed earlier run left is removed (or its interrupted swap recovered)
    sinks = [ShardSink(stage / f"view-{k:02d}", "views", max_samples_per_shard) for k in range(spec.views)]
    try:
        for sink in sinks:
            sink.dir.mkdir()
        raw = raw_samples(source)
        head = [next(raw) for _ in range(min(8, n))]
        first = [make_views(s, spec) for s in head]
        log(f"targets: {n} images x {spec.views} views at {spec.input_size}px ({spec.target}, {spec.dtype}): "
            f"projected size on disk {_human(projected_bytes(first, spec, n))}")
        results = _compute(raw, spec, workers)
        for views in [*first, *results]:
            for sink, sample in zip(sinks, views, strict=True):
                sink.write(tar_members(sample["__key__"], {k: v for k, v in sample.items() if k != "__key__"}))
        for sink in sinks:
            sink.close()
        manifest = _manifest(spec, sinks, n, src, extra)
        (stage / VIEWS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(stage, out)  # the old view shards are kept until the new ones are in place
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _compute(raw: Iterator[dict[str, Any]], spec: ViewSpec, workers: int) -> Iterator[list[dict[str, Any]]]:
    if workers <= 1:
        yield from (make_views(s, spec) for s in raw)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        yield from pool.imap(_make_views_job, ((s, spec) for s in raw), chunksize=4)


def _manifest(spec: ViewSpec, sinks: list[ShardSink], n: int, src: Path, extra: dict | None) -> dict[str, Any]:
    view_dirs = [s.dir.name for s in sinks]
    for s in sinks:
        (s.dir / f"{s.dir.name}.json").write_text(json.dumps({"shards": s.shards, "num_samples": n}, indent=2))
    total = sum(sh["bytes"] for s in sinks for sh in s.shards)
    return {
        "views": spec.views,
        "view_dirs": view_dirs,
        "num_samples": n,
        "input_size": spec.input_size,
        "target": spec.target,
        "hog_nbins": spec.hog_nbins,
        "cells": list(spec.cells),
        "finest_cell": spec.finest_cell,
        "hog_shape": list(spec.hog_shape) if spec.target == "hog" else None,
        "dtype": spec.dtype,
        "seed": spec.seed,
        "source": str(src),
        "total_bytes": total,
        "per_view": {s.dir.name: s.shards for s in sinks},
        **(extra or {}),
    }


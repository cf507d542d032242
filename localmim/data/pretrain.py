"""WebDataset input for pre-training: raw shards with online augmentation, or precomputed view shards.

Splitting invariant (non-resampled mode): in one epoch every sample is read by exactly one rank and, inside
the rank, by exactly one DataLoader worker. Shards are shuffled per epoch (same order on every rank) and dealt
to the workers (the ``s``-th shard of the epoch order -> worker ``s % num_workers``, the same on every rank); sample
``i`` of the epoch stream (its shard's offset from the manifest counts plus its position in the shard) goes to rank
``i % world``. Each rank therefore reads the bytes of its workers' shards in full but decodes only its own samples,
and gets ``N // world`` or one more whatever the load of each worker. The epoch length is defined by samples:
``N // world // batch_size`` batches per rank (equal on every rank, so DDP stays in lockstep), whatever the
number of shards or workers; the few left-over samples of an epoch are dropped (``drop_last``, SPEC §7).

Resampled mode (for many nodes): every (rank, worker) draws shards with replacement from its own seeded
stream and takes all their samples; the epoch is still ``N // world // batch_size`` batches.

Determinism: the shard order, the shuffle buffers and every sample's augmentation are functions of
``(seed, epoch, ...)`` only (augmentation: of ``(seed, epoch, sample key)``), so a resumed run replays the
same batches; resuming mid-epoch skips the consumed batches.

Online augmentation (SPEC §7): RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) then a horizontal flip
with p = 0.5, producing uint8 [3, S, S] tensors (the model normalises on device and computes HOG from uint8).
Views mode: epoch ``e`` reads view ``e mod K`` of the view shards written by :mod:`localmim.data.views`, each
sample a stored uint8 view plus its un-normalised finest-cell histograms (fp16).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
VIEWS_MANIFEST = "views.json"


@dataclass(frozen=True)
class ShardSet:
    """Tar shards of one directory with their sample counts."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _count_tar(url: str) -> int:
    import webdataset as wds

    return sum(1 for _ in wds.tariterators.tarfile_samples([{"url": url}]))


def shard_set(directory: str | Path) -> ShardSet:
    """The shards of ``directory`` with their counts, from its manifest (``<split>.json`` with a ``shards`` list of
    ``{name, num_samples}``; ``train.json`` when a directory holds several splits), else every ``*.tar`` counted
    by scanning.

    Raises:
        ValueError: no shards, several manifests and none is ``train.json``, or a listed shard is missing.
    """
    directory = Path(directory)
    manifests = {}
    for p in sorted(directory.glob("*.json")):
        data = json.loads(p.read_text())
        if isinstance(data, dict) and isinstance(data.get("shards"), list):
            manifests[p.name] = data
    if len(manifests) > 1 and "train.json" not in manifests:
        raise ValueError(f"{directory}: several shard manifests {sorted(manifests)}; expected one or train.json")
    if manifests:
        data = manifests.get("train.json") or next(iter(manifests.values()))
        urls = [directory / Path(s["name"]).name for s in data["shards"]]
        missing = [u.name for u in urls if not u.is_file()]
        if missing:
            raise ValueError(f"{directory}: manifest lists missing shards {missing}")
        return ShardSet(tuple(map(str, urls)), tuple(int(s["num_samples"]) for s in data["shards"]))
    urls = sorted(directory.glob("*.tar"))
    if not urls:
        raise ValueError(f"{directory}: no *.tar shards found")
    return ShardSet(tuple(map(str, urls)), tuple(_count_tar(str(u)) for u in urls))


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The augmentation RNG of one sample in one epoch: independent of rank, worker and order."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def sample_crop(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop box ``(top, left, h, w)`` with SCALE/RATIO; torchvision's rule (10 tries, then the
    largest centred crop within the ratio range), drawn from ``rng`` instead of the global torch RNG."""
    area = width * height
    log_r = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_view(img, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, int]]:
    """One augmented view: bicubic resized crop to ``size`` then a flip with p = 0.5.

    Returns:
        (uint8 tensor [3, size, size], crop params ``{top, left, height, width, flip, src_w, src_h}``).
    """
    from PIL import Image

    top, left, h, w = sample_crop(rng, img.width, img.height)
    flip = bool(rng.random() < 0.5)
    # crop then resize, as torchvision's resized_crop does on PIL images
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    params = {"top": top, "left": left, "height": h, "width": w, "flip": int(flip), "src_w": img.width}
    params["src_h"] = img.height
    return pil_to_uint8(out), params


def pil_to_uint8(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_image(sample: dict[str, Any]):
    from PIL import Image

    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')}: no image entry ({'/'.join(IMAGE_EXTS)})")
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_view(sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stored view: (uint8 [3, S, S], fp16/fp32 finest-cell histograms or None for pixel targets)."""
    img = pil_to_uint8(decode_image(sample))
    hog = sample.get("hog.npy")
    return img, (torch.from_numpy(np.load(io.BytesIO(hog))) if hog is not None else None)


def read_views_manifest(views_dir: str | Path) -> dict[str, Any]:
    path = Path(views_dir) / VIEWS_MANIFEST
    if not path.is_file():
        raise ValueError(f"{views_dir}: no {VIEWS_MANIFEST}; run `localmim targets` first")
    return json.loads(path.read_text())


class PretrainStream(IterableDataset):
    """Per-worker stream of batches (chunks of up to ``batch_size``) for pre-training; see module docstring.

    Items are uint8 image tensors ``[b, 3, S, S]`` (online) or ``(images, finest)`` tuples (views; ``finest``
    is None-free only for HOG targets). Use through :class:`PretrainLoader`, which re-batches to exact batches.

    Args:
        source: raw train shard directory (online) or view shard directory (views).
        input_size: S of the views (online crop size; must match the view shards).
        batch_size: per-rank batch size.
        seed: base seed (shuffles and augmentation).
        shuffle_buffer: samples (raw bytes) held by each worker's shuffle buffer; 0 = no sample shuffle.
        resampled: draw shards with replacement (see module docstring).
        rank, world: this process's data-parallel position.
        views: read view shards instead of raw shards.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        input_size: int,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        rank: int = 0,
        world: int = 1,
        views: bool = False,
    ):
        if batch_size < 1 or world < 1 or not 0 <= rank < world or shuffle_buffer < 0 or seed < 0:
            raise ValueError(
                f"bad data split: batch_size={batch_size}, rank={rank}, world={world}, "
                f"shuffle_buffer={shuffle_buffer}, seed={seed}"
            )
        self.source, self.views = Path(source), views
        self.input_size, self.batch_size, self.seed = input_size, batch_size, seed
        self.shuffle_buffer, self.resampled, self.rank, self.world = shuffle_buffer, resampled, rank, world
        self.epoch = 0
        if views:
            man = read_views_manifest(source)
            if man["input_size"] != input_size:
                raise ValueError(f"{source}: views are {man['input_size']} px but input_size={input_size}")
            self.num_views = int(man["views"])
            self.sets = [shard_set(self.source / d) for d in man["view_dirs"]]
        else:
            self.num_views = 1
            self.sets = [shard_set(self.source)]
        self.num_samples = self.sets[0].total
        if self.num_samples // world < batch_size:
            raise ValueError(
                f"{source}: {self.num_samples} samples over {world} rank(s) is fewer than one batch of "
                f"{batch_size}; lower batch_size"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every rank: ``N // world // batch_size``."""
        return self.num_samples // self.world // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _raw_samples(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        shards = self.sets[self.epoch % self.num_views]
        if self.resampled:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{wid}")
            while True:
                yield from wds.tariterators.tarfile_samples([{"url": rng.choice(shards.urls)}])
        order = list(range(len(shards.urls)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)  # same order on every rank
        offsets = dict(zip(order, itertools.accumulate([shards.counts[i] for i in order], initial=0), strict=False))
        for i in order[wid::nw]:
            # rank by the sample's index in the whole epoch stream, so ranks get N // world or one more
            for k, sample in enumerate(wds.tariterators.tarfile_samples([{"url": shards.urls[i]}])):
                if (offsets[i] + k) % self.world == self.rank:
                    yield sample

    def samples(self, wid: int = 0, nw: int = 1) -> Iterator[dict[str, Any]]:
        """Raw (undecoded) samples of worker ``wid`` of ``nw`` on this rank, after the shuffle buffer."""
        import webdataset as wds

        stream = self._raw_samples(wid, nw)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{wid}/buffer")
            stream = wds.filters._shuffle(stream, self.shuffle_buffer, self.shuffle_buffer, rng=rng)
        return stream

    def decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.views:
            return decode_view(sample)
        img = decode_image(sample)
        view, _ = random_view(img, self.input_size, sample_rng(self.seed, self.epoch, sample["__key__"]))
        return view, None

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        chunk: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for sample in self.samples(wid, nw):
            chunk.append(self.decode(sample))
            if len(chunk) == self.batch_size:
                yield _collate(chunk)
                chunk = []
        if chunk:
            yield _collate(chunk)


def _collate(items: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Any:
    imgs = torch.stack([x for x, _ in items])  # [b, 3, S, S] uint8
    if items[0][1] is None:
        return imgs
    return imgs, torch.stack([t for _, t in items])  # [b, ...finest] fp16


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return tuple(_cat([p[i] for p in parts]) for i in range(len(parts[0])))


def _split(x: Any, n: int) -> tuple[Any, Any]:
    if isinstance(x, torch.Tensor):
        return x[:n], x[n:]
    heads, tails = zip(*(_split(t, n) for t in x), strict=True)
    return tuple(heads), tuple(tails)


def _len(x: Any) -> int:
    return len(x) if isinstance(x, torch.Tensor) else len(x[0])


def rebatch(chunks: Iterator[Any], batch_size: int, steps: int) -> Iterator[Any]:
    """Exact ``batch_size`` batches from worker chunks, at most ``steps`` of them (full chunks pass through)."""
    pending: list[Any] = []
    have = done = 0
    for c in chunks:
        pending.append(c)
        have += _len(c)
        while have >= batch_size and done < steps:
            merged = _cat(pending)
            head, tail = _split(merged, batch_size)
            pending, have = ([tail] if _len(tail) else []), have - batch_size
            done += 1
            yield head
        if done >= steps:
            return


class PretrainLoader:
    """DataLoader wrapper yielding exactly ``steps_per_epoch`` full batches per epoch.

    A fresh DataLoader is built per epoch so that workers see the epoch (shuffles and augmentation depend on it).

    Args:
        ds: the stream.
        num_workers: DataLoader worker processes (0 = in the main process).
        pin_memory: pin batches for asynchronous host-to-device copies.
    """

    def __init__(self, ds: PretrainStream, num_workers: int = 2, pin_memory: bool = False):
        self.ds, self.num_workers, self.pin_memory = ds, num_workers, pin_memory

    def __len__(self) -> int:
        return self.ds.steps_per_epoch

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        """Batches of ``epoch`` after the first ``skip`` (for a mid-epoch resume)."""
        from torch.utils.data import DataLoader

        self.ds.set_epoch(epoch)
        dl = DataLoader(
            self.ds,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers > 0 else None,
            # Own generator: the workers' base seed must not be drawn from the global torch RNG, which drives
            # the masking noise (a mid-epoch resume would otherwise draw it once more than the original run).
            generator=torch.Generator().manual_seed(self.ds.seed * 1_000_003 + epoch),
        )
        for i, batch in enumerate(rebatch(iter(dl), self.ds.batch_size, len(self))):
            if i >= skip:
                yield _pin(batch) if self.pin_memory else batch


def _pin(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.is_pinned() else x.pin_memory()
    return tuple(_pin(t) for t in x)

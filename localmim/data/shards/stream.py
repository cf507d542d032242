"""The one way shards are read: a webdataset ``DataPipeline`` per (rank, DataLoader worker), re-batched.

Used by pretraining (raw shards with online augmentation, or view shards), fine-tuning, linear probing and
evaluation (:mod:`localmim.data.pretrain`, :mod:`localmim.data.classify`), the view writer (:func:`raw_samples`) and the benchmarks.
Each worker runs ``shards -> tar_samples -> rank share -> wds.shuffle -> wds.map(decode) -> wds.batched``; the
loader merges the workers' chunks into exact batches. The map stage decodes the member bytes itself
(:func:`decode_rgb`, ``int``, ``np.load``): webdataset's generic ``wds.decode`` stage in front of it cost 1.5-4 %
more CPU per image in the read benchmark (benchmarks/RESULTS.md, bench_shards), for the same decoders.

Splitting invariant (non-resampled): in one epoch every sample is read by exactly one rank and, inside the rank,
by exactly one DataLoader worker. Shards are shuffled per epoch when training (the same order on every rank) and
dealt to the workers (the ``s``-th shard of the epoch order -> worker ``s % num_workers``, the same on every
rank); sample ``i`` of the epoch stream (its shard's offset from the manifest counts plus its position in the
shard) goes to rank ``i % world``. Each rank therefore reads the bytes of its workers' shards in full but decodes
only its own samples, and gets ``N // world`` or one more, whatever the load of each worker. Training epochs are
``N // world // batch_size`` batches on every rank (equal, so DDP stays in lockstep; the few left-over samples
are dropped, ``drop_last``); evaluation reads every sample of the rank, the last batch possibly partial.

Trade-off: all ranks together read the dataset's bytes ``world`` times (reading a tar is sequential and cheap
next to JPEG decoding, but on many nodes the I/O adds up). Resampled mode (for many nodes): every (rank, worker)
draws shards with replacement from its own seeded stream and takes all their samples; the epoch is still
``N // world // batch_size`` batches.

Determinism: the shard order and the shuffle buffers are functions of ``(seed, epoch, rank, worker)`` only and
the DataLoader's worker seeds of ``(seed, epoch)``, so a resumed run replays the same batches; resuming mid-epoch
skips the consumed batches (:meth:`ShardLoader.epoch`).
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import webdataset as wds  # imported with this module, in the main process: the per-epoch DataLoader workers are
from PIL import Image  # forked from it and find both loaded, rather than importing them again every epoch
from torch.utils.data import IterableDataset, get_worker_info

from localmim.data.shards.manifest import IMAGE_EXTS, ShardSet
from localmim.data.shards.tario import iter_samples, tar_samples


def decode_rgb(data: bytes):
    """Image bytes -> RGB PIL image (the one image decoder of the data layer)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def image_entry(sample: dict[str, Any]) -> bytes:
    """The bytes of the sample's image member; ValueError if it has none."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')}: no image entry "
                     f"({'/'.join(IMAGE_EXTS)})")  # fmt: skip


def raw_samples(shards: ShardSet) -> Iterator[dict[str, Any]]:
    """Every raw (undecoded) sample of ``shards``, in manifest order."""
    urls = [{"url": u} for u in shards.urls]
    return iter(wds.DataPipeline(lambda: iter(urls), tar_samples))


def worker_shards(shards: ShardSet, *, seed: int, epoch: int, shuffle: bool, wid: int, nw: int) -> list[dict]:
    """Shards of worker ``wid`` of ``nw`` in ``epoch``, each ``{"url", "offset"}`` (offset: position of its first
    sample in the epoch stream). The order is the same on every rank."""
    order = list(range(len(shards.urls)))
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)
    offsets = dict(zip(order, itertools.accumulate([shards.counts[i] for i in order], initial=0), strict=False))
    return [{"url": shards.urls[i], "offset": offsets[i]} for i in order[wid::nw]]


class RankShare:
    """Pipeline stage: shards ``{"url", "offset"}`` -> the samples of rank ``rank`` (epoch index % world)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            for k, sample in enumerate(iter_samples(shard["url"])):
                if (shard["offset"] + k) % self.world == self.rank:
                    yield sample


def resampled(shards: ShardSet, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Endless shard dicts drawn with replacement."""
    while True:
        yield {"url": rng.choice(shards.urls)}


class ShardStream(IterableDataset):
    """Per-worker stream of chunks (up to ``batch_size`` items) over one shard directory; see module docstring.

    Subclasses say how a raw sample becomes an item (:meth:`decode`) and how items become a chunk
    (:meth:`collate`). Use through :class:`ShardLoader`.

    Args:
        sets: the shards; with several (view shards), epoch ``e`` reads ``sets[e % len(sets)]``.
        batch_size: per-rank batch size.
        train: shuffle shards per epoch and drop the left-over samples; else read in order, everything.
        seed: base seed of the shuffles (and of the DataLoader's worker seeds).
        shuffle_buffer: samples (raw bytes) held by each worker's shuffle buffer (training); 0 = none.
        resampled: draw shards with replacement (training on many nodes).
        rank, world: this process's data-parallel position.
    """

    def __init__(self, sets: Sequence[ShardSet], *, batch_size: int, train: bool, seed: int = 0,
                 shuffle_buffer: int = 0, resampled: bool = False, rank: int = 0, world: int = 1):  # fmt: skip
        if batch_size < 1 or world < 1 or not 0 <= rank < world or shuffle_buffer < 0 or seed < 0:
            raise ValueError(f"bad data split: batch_size={batch_size}, rank={rank}, world={world}, "
                             f"shuffle_buffer={shuffle_buffer}, seed={seed}")  # fmt: skip
        self.sets, self.batch_size, self.train, self.seed = list(sets), batch_size, train, seed
        self.shuffle_buffer, self.resampled, self.rank, self.world = shuffle_buffer, resampled, rank, world
        self.epoch = 0
        self.num_samples = self.sets[0].total
        self.rank_samples = self.num_samples // world + int(rank < self.num_samples % world)
        if train and self.num_samples // world < batch_size:
            raise ValueError(f"{len(self.sets[0].urls)} shards: {self.num_samples} samples over {world} rank(s) "
                             f"is fewer than one batch of {batch_size}; lower batch_size")  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on this rank: ``N // world // batch_size`` when training (equal on every rank),
        else every sample of the rank in ``ceil(rank_samples / batch_size)`` batches."""
        if self.train:
            return self.num_samples // self.world // self.batch_size
        return -(-self.rank_samples // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def shards(self) -> ShardSet:
        """The shards read in the current epoch."""
        return self.sets[self.epoch % len(self.sets)]

    def samples(self, wid: int = 0, nw: int = 1) -> Iterator[dict[str, Any]]:
        """Raw (undecoded) samples of worker ``wid`` of ``nw`` on this rank, after the shuffle buffer."""
        if self.resampled:
            draws = resampled(self.shards, random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{wid}"))
            src = [lambda: draws, tar_samples]
        else:
            plan = worker_shards(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.train, wid=wid, nw=nw)
            src = [lambda: iter(plan), RankShare(self.rank, self.world)]
        if self.train and self.shuffle_buffer > 1:
            buffer_rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{wid}/buffer")
            src.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=buffer_rng))
        return iter(wds.DataPipeline(*src))

    def decode(self, sample: dict[str, Any]) -> Any:
        """A raw sample (``{"__key__", "__url__", ext: bytes}``) -> one item; images through :func:`decode_rgb`."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        """Items -> one chunk. Use ``torch.utils.data.default_collate``: in a DataLoader worker it stacks straight
        into shared memory, saving a copy of every batch on its way to the main process."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(wds.DataPipeline(
            lambda: self.samples(wid, nw),
            wds.map(self.decode),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=True),
        ))  # fmt: skip


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


def rebatch(chunks: Iterator[Any], batch_size: int, steps: int, partial: bool = False) -> Iterator[Any]:
    """Exact ``batch_size`` batches from worker chunks, at most ``steps`` of them (full chunks pass through);
    with ``partial``, what is left at the end comes as one last, smaller batch."""
    pending: list[Any] = []
    have = done = 0
    for c in chunks:
        pending.append(c)
        have += _len(c)
        while have >= batch_size and done < steps:
            head, tail = _split(_cat(pending), batch_size)
            pending, have = ([tail] if _len(tail) else []), have - batch_size
            done += 1
            yield head
        if done >= steps:
            return
    if partial and pending:
        yield _cat(pending)


def _pin(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.is_pinned() else x.pin_memory()
    return tuple(_pin(t) for t in x)


class ShardLoader:
    """DataLoader wrapper yielding exactly ``len(ds)`` batches per epoch (full ones when training).

    A fresh DataLoader is built per epoch so that workers see the epoch (shuffles and augmentation depend on it).

    Args:
        ds: the stream.
        num_workers: DataLoader worker processes (0 = in the main process); at most one per shard is started.
        pin_memory: pin batches for asynchronous host-to-device copies.
        prefetch_factor: chunks each worker prepares ahead (deeper absorbs jitter, costs some CPU and memory).
    """

    def __init__(self, ds: ShardStream, num_workers: int = 2, pin_memory: bool = False, prefetch_factor: int = 2):
        self.ds, self.num_workers, self.pin_memory, self.prefetch_factor = ds, num_workers, pin_memory, prefetch_factor

    def __len__(self) -> int:
        return self.ds.steps_per_epoch

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        """Batches of ``epoch`` after the first ``skip`` (for a mid-epoch resume)."""
        from torch.utils.data import DataLoader

        self.ds.set_epoch(epoch)
        nw = self.num_workers if self.ds.resampled else min(self.num_workers, len(self.ds.shards.urls))
        dl = DataLoader(
            self.ds,
            batch_size=None,
            num_workers=nw,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if nw > 0 else None,
            # Own generator: the workers' base seed must not be drawn from the global torch RNG, which drives
            # the masking noise (a mid-epoch resume would otherwise draw it once more than the original run).
            generator=torch.Generator().manual_seed(self.ds.seed * 1_000_003 + epoch),
        )
        for i, batch in enumerate(rebatch(iter(dl), self.ds.batch_size, len(self), partial=not self.ds.train)):
            if i >= skip:
                yield _pin(batch) if self.pin_memory else batch

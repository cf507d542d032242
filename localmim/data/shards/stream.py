"""The one way shards are read: a webdataset ``DataPipeline`` per (rank, DataLoader worker), re-batched.

Used by pretraining (raw shards with online augmentation, or view shards), fine-tuning, linear probing and
evaluation (:mod:`localmim.data.pretrain`, :mod:`localmim.data.classify`), the view writer (:func:`raw_samples`) and
the benchmarks.
Each worker runs ``shards -> tar_samples -> rank share -> wds.shuffle -> wds.map(decode) -> wds.batched``; the
loader merges the workers' chunks into exact batches. The map stage decodes the member bytes itself
(:func:`decode_rgb`, ``int``, ``np.load``): webdataset's generic ``wds.decode`` stage in front of it cost 1.5-4 %
more CPU per image in the read benchmark (benchmarks/RESULTS.md, bench_shards), for the same decoders.

Splitting invariant (non-resampled): in one epoch every sample is read by exactly one rank and, inside the rank,
by exactly one DataLoader worker. Shards are shuffled per epoch when training (the same order on every rank) and
dealt to the workers (the ``s``-th shard of the epoch order -> worker ``s % num_workers``, the same on every
rank); sample ``i`` of the epoch stream (its shard's offset from the manifest counts plus its position in the
shard) goes to rank ``i % world``. Each rank therefore reads the bytes of its workers' shards in full but decodes
only its own samples, and gets ``N // world`` or one more, whatever the load of each worker. A training epoch is
``N // global_batch`` optimizer steps of ``global_batch / (world x batch_size)`` micro-batches on every rank
(equal, so DDP stays in lockstep; the few left-over samples are dropped, ``drop_last``); evaluation reads every
sample of the rank, the last batch possibly partial.

Position within an epoch (``with_index``): every sample has an epoch index, its position in the epoch stream (a
function of ``(seed, epoch)`` only, not of the world size), carried with each batch. :meth:`ShardLoader.position`
gathers the indices the ranks consumed into one bitmap; an epoch resumed with the same reader (world size,
per-rank batch, workers) replays its stream and skips the consumed batches, bit for bit, and one resumed with
another reader excludes the consumed samples and deals the rest anew (the ``j``-th remaining sample to rank
``j % world``): no sample of the epoch is read twice or skipped, on any number of ranks.

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

import numpy as np
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
    """Pipeline stage: shards ``{"url", "offset"}`` -> the samples of rank ``rank``, each with its epoch index
    ``__index__``: epoch index % world, or with ``rank_of`` (an array over the epoch's samples: the rank of each, -1 for
    an excluded one) that rank."""

    def __init__(self, rank: int, world: int, rank_of: np.ndarray | None = None):
        self.rank, self.world, self.rank_of = rank, world, rank_of

    def __call__(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            for k, sample in enumerate(iter_samples(shard["url"])):
                i = shard["offset"] + k
                if (i % self.world if self.rank_of is None else self.rank_of[i]) == self.rank:
                    sample["__index__"] = i
                    yield sample


def deal_remaining(consumed: np.ndarray, world: int) -> np.ndarray:
    """The rank of each sample of an epoch when the ``consumed`` ones (bool ``[N]``) are left out: the ``j``-th
    remaining sample (in epoch order) goes to rank ``j % world``; consumed ones get -1."""
    rank_of = np.full(len(consumed), -1, dtype=np.int32)
    keep = ~consumed
    rank_of[keep] = np.arange(int(keep.sum()), dtype=np.int32) % world
    return rank_of


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
        global_batch: samples per optimizer step over all ranks (training; default ``batch_size x world``): the
            epoch is ``N // global_batch`` steps of ``global_batch / (world x batch_size)`` batches on every rank.
        with_index: batches are ``(chunk, (index [b] int64, keys [b] str array))``, each sample's epoch index and
            key (what a resumable training loop records; :meth:`ShardLoader.position`).
    """

    def __init__(self, sets: Sequence[ShardSet], *, batch_size: int, train: bool, seed: int = 0,
                 shuffle_buffer: int = 0, resampled: bool = False, rank: int = 0, world: int = 1,
                 global_batch: int | None = None, with_index: bool = False):  # fmt: skip
        global_batch = global_batch or batch_size * world
        if (batch_size < 1 or world < 1 or not 0 <= rank < world or shuffle_buffer < 0 or seed < 0
                or global_batch % (batch_size * world)):
            raise ValueError(f"bad data split: batch_size={batch_size}, rank={rank}, world={world}, global_batch="
                             f"{global_batch}, shuffle_buffer={shuffle_buffer}, seed={seed}")  # fmt: skip
        self.sets, self.batch_size, self.train, self.seed = list(sets), batch_size, train, seed
        self.shuffle_buffer, self.resampled, self.rank, self.world = shuffle_buffer, resampled, rank, world
        self.global_batch, self.with_index = global_batch, with_index
        self.epoch, self.rank_of = 0, None
        self.num_samples = self.sets[0].total
        self.rank_samples = self.num_samples // world + int(rank < self.num_samples % world)
        if train and self.num_samples < global_batch:
            raise ValueError(f"{len(self.sets[0].urls)} shards: {self.num_samples} samples are fewer than one "
                             f"global batch of {global_batch} (batch_size {batch_size} x {world} rank(s) x "
                             f"{self.accum} accumulation); lower the batch")  # fmt: skip

    @property
    def accum(self) -> int:
        """Batches of this rank per optimizer step (training)."""
        return self.global_batch // (self.batch_size * self.world)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per training epoch: ``N // global_batch``."""
        return self.num_samples // self.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on this rank: ``optimizer_steps x accum`` when training (equal on every rank; with one
        batch per step ``N // world // batch_size``), else every sample of the rank in
        ``ceil(rank_samples / batch_size)`` batches."""
        if self.train:
            return self.optimizer_steps * self.accum
        return -(-self.rank_samples // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int, rank_of: np.ndarray | None = None) -> None:
        """Read ``epoch``; ``rank_of`` (:func:`deal_remaining`) leaves consumed samples out and deals the rest."""
        self.epoch, self.rank_of = epoch, rank_of

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
            src = [lambda: iter(plan), RankShare(self.rank, self.world, self.rank_of)]
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

    def _decode_indexed(self, sample: dict[str, Any]) -> tuple[Any, int, str]:
        return self.decode(sample), sample.get("__index__", -1), sample["__key__"]

    def _collate_indexed(self, items: list[tuple[Any, int, str]]) -> tuple[Any, tuple[torch.Tensor, np.ndarray]]:
        # keys as a NumPy str array: the DataLoader passes it through as it is (a list would become a structure)
        return self.collate([x for x, _, _ in items]), (torch.tensor([i for _, i, _ in items]),
                                                        np.array([k for *_, k in items]))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        decode, collate = (self._decode_indexed, self._collate_indexed) if self.with_index else (self.decode,
                                                                                                  self.collate)
        return iter(wds.DataPipeline(
            lambda: self.samples(wid, nw),
            wds.map(decode),
            wds.batched(self.batch_size, collation_fn=collate, partial=True),
        ))  # fmt: skip


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if isinstance(parts[0], np.ndarray):  # keys
        return np.concatenate(parts)
    return tuple(_cat([p[i] for p in parts]) for i in range(len(parts[0])))


def _split(x: Any, n: int) -> tuple[Any, Any]:
    if isinstance(x, torch.Tensor | np.ndarray):
        return x[:n], x[n:]
    heads, tails = zip(*(_split(t, n) for t in x), strict=True)
    return tuple(heads), tuple(tails)


def _len(x: Any) -> int:
    return len(x) if isinstance(x, torch.Tensor | np.ndarray) else _len(x[0])


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
    if isinstance(x, np.ndarray):
        return x
    return tuple(_pin(t) for t in x)


class ShardLoader:
    """DataLoader wrapper yielding exactly ``len(ds)`` batches per epoch (full ones when training).

    A fresh DataLoader is built per epoch so that workers see the epoch (shuffles and augmentation depend on it).
    With ``ds.with_index`` it keeps the epoch indices of the batches it yielded (:meth:`position`, :meth:`resume`).

    Args:
        ds: the stream.
        num_workers: DataLoader worker processes (0 = in the main process); at most one per shard is started.
        pin_memory: pin batches for asynchronous host-to-device copies.
        prefetch_factor: chunks each worker prepares ahead (deeper absorbs jitter, costs some CPU and memory).
    """

    def __init__(self, ds: ShardStream, num_workers: int = 2, pin_memory: bool = False, prefetch_factor: int = 2):
        self.ds, self.num_workers, self.pin_memory, self.prefetch_factor = ds, num_workers, pin_memory, prefetch_factor
        self._segment: dict[str, Any] = {}  # how the current stretch of the epoch is read (see :meth:`position`)
        self._seen: list[torch.Tensor] = []  # epoch indices yielded in it

    def __len__(self) -> int:
        return self.ds.steps_per_epoch

    def epoch(self, epoch: int, skip: int = 0, *, rank_of: np.ndarray | None = None,
              batches: int | None = None) -> Iterator[Any]:
        """Batches of ``epoch`` after the first ``skip`` (for a mid-epoch resume), at most ``batches`` of them
        (default: the epoch's); ``rank_of`` deals the samples (:func:`deal_remaining`)."""
        from torch.utils.data import DataLoader

        self.ds.set_epoch(epoch, rank_of)
        self._segment = {"epoch": epoch, "reader": self.reader(), "rank_of": rank_of, "skip": skip}
        self._seen = []
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
        total = len(self) if batches is None else skip + batches
        for i, batch in enumerate(rebatch(iter(dl), self.ds.batch_size, total, partial=not self.ds.train)):
            if i >= skip:
                if self.ds.with_index:
                    self._seen.append(batch[1][0])
                yield _pin(batch) if self.pin_memory else batch

    def from_step(self, epoch: int, done: int, position: dict[str, Any] | None = None) -> Iterator[Any]:
        """The rest of training epoch ``epoch`` from optimizer step ``done``: ``(optimizer_steps - done) x accum``
        batches; ``position`` (:meth:`position` of a checkpoint in this epoch) says which samples were consumed, else
        the first ``done x accum`` batches of this reader's stream are skipped."""
        accum = self.ds.accum
        skip, rank_of = (done * accum, None) if position is None else self.resume(epoch, position)
        return self.epoch(epoch, skip, rank_of=rank_of, batches=(self.ds.optimizer_steps - done) * accum)

    def reader(self) -> dict[str, Any]:
        """What fixes each rank's stream besides the epoch: replaying a segment needs the same."""
        d = self.ds
        return {"world": d.world, "batch_size": d.batch_size, "num_workers": self.num_workers,
                "shuffle_buffer": d.shuffle_buffer, "resampled": d.resampled, "global_batch": d.global_batch}

    def position(self) -> dict[str, Any]:
        """The data position of the current epoch (a collective under torch.distributed: every rank's consumed
        indices are gathered): the reader and deal of the current segment, its batches yielded on each rank, and the
        bitmap of every sample consumed in the epoch so far (weights_only-safe: tensors, ints, dicts)."""
        import torch.distributed as tdist

        mine = torch.cat(self._seen) if self._seen else torch.zeros(0, dtype=torch.int64)
        parts = [mine]
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            parts = [None] * tdist.get_world_size()
            tdist.all_gather_object(parts, mine)
        consumed = np.zeros(self.ds.num_samples, dtype=bool)
        if self._segment.get("rank_of") is not None:
            consumed |= self._segment["rank_of"] < 0
        for p in parts:
            consumed[p.numpy()] = True
        seg = self._segment
        rank_of = seg.get("rank_of")
        return {"epoch": seg.get("epoch", 0), "reader": seg.get("reader", self.reader()),
                "excluded": None if rank_of is None else _pack(rank_of < 0),
                "batches": seg.get("skip", 0) + len(self._seen), "consumed": _pack(consumed)}

    def resume(self, epoch: int, position: dict[str, Any] | None) -> tuple[int, np.ndarray | None]:
        """``(skip, rank_of)`` to pass to :meth:`epoch` to continue ``epoch`` from ``position``: the same reader
        replays its segment and skips its yielded batches; another reader deals the samples not yet consumed anew."""
        if position is None or position["epoch"] != epoch:
            return 0, None
        if position["reader"] == self.reader():
            excl = position["excluded"]
            return position["batches"], None if excl is None else deal_remaining(_unpack(excl, self.ds), self.ds.world)
        if self.ds.resampled:  # draws with replacement: nothing to exclude, the epoch's remaining steps are drawn anew
            return 0, None
        return 0, deal_remaining(_unpack(position["consumed"], self.ds), self.ds.world)


def _pack(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits))


def _unpack(packed: torch.Tensor, ds: ShardStream) -> np.ndarray:
    return np.unpackbits(packed.numpy(), count=ds.num_samples).astype(bool)

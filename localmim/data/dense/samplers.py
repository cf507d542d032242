"""Global-batch samplers of the dense stages (method §9, §17 row 39): the samples of optimizer step ``k`` are a
function of ``(seed, step or epoch, global_batch)`` only, never of the world size or the per-device batch.

The global batch ``G`` of a step is a fixed slice of a seeded permutation of the ``N`` training items (positions
``0 .. G-1`` of the slice). With ``world`` ranks of ``batch_size`` items and ``accum = G / (batch_size x world)``
micro-batches per optimizer step, it is dealt by position (:func:`positions`): micro-batch ``m`` of rank ``r`` holds
positions ``(m x world + r) x batch_size + j`` (``j < batch_size``), i.e. the global batch is cut into ``accum``
slices of ``world x batch_size``, one per micro-batch, each cut into the ranks' shares in rank order. So on any
world size the union of a step's micro-batches over the ranks is the same set of items, and a run resumed at an
optimizer step on another world size continues with the same global batches.

* :class:`StepBatches` (segment, iteration-based): step ``s`` lies in epoch ``s // (N // G)``, whose permutation is
  ``randperm(N)`` seeded by ``seed x 1_000_003 + epoch``; its global batch is that permutation's
  ``(s mod (N // G))``-th slice of ``G``. Every item carries its augmentation seed
  ``(seed x 1_000_003 + s) x G + p`` (``p``: its position in the global batch), so the data stream is a pure
  function of the step. With one rank and no accumulation (``G = batch_size``) this is the sampler segment always
  had: the same batches and seeds.
* :class:`EpochBatches` (detect, epoch-based): the permutation of epoch ``e`` is the one
  ``DistributedSampler(shuffle=True, seed)`` draws (``randperm(N)`` seeded by ``seed + e``); an epoch is ``N // G``
  optimizer steps, the last partial global batch dropped (as pretraining does). With one rank and no accumulation
  this is ``DistributedSampler`` batched by ``batch_size`` without its last partial batch. The items carry no seed:
  the augmentation draws are the loader's (``localmim.train.detect``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SEED_STRIDE = 1_000_003  # seed x SEED_STRIDE + (epoch or step): one stream per seed, far apart


def accumulation(global_batch: int, batch_size: int, world: int) -> int:
    """Micro-batches per optimizer step on every rank: ``global_batch / (batch_size x world)``.

    Raises:
        ValueError: ``global_batch`` is not a multiple of ``batch_size x world`` (the message names the three).
    """
    per_step = batch_size * world
    if global_batch % per_step:
        raise ValueError(f"global_batch={global_batch} is not a multiple of batch_size={batch_size} x "
                         f"world_size={world} (= {per_step})")
    return global_batch // per_step


def positions(micro: int, batch_size: int, world: int, rank: int) -> range:
    """Positions in the global batch of micro-batch ``micro`` of rank ``rank`` (module docstring)."""
    start = (micro * world + rank) * batch_size
    return range(start, start + batch_size)


class _GlobalBatches(torch.utils.data.Sampler):
    """What both samplers share: the global batch ``G`` (default ``batch_size x world``: no accumulation), its
    accumulation on this world, and the optimizer steps per pass over the ``n`` items (``n // G``)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, global_batch: int | None):
        self.g = global_batch or batch_size * world
        self.accum = accumulation(self.g, batch_size, world)
        self.per_epoch = n // self.g  # optimizer steps per pass; the last partial global batch is dropped
        if self.per_epoch < 1:
            raise ValueError(f"{n} training images are fewer than the global batch of {self.g} (batch_size "
                             f"{batch_size} x {world} rank(s) x {self.accum} accumulation)")
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    def _micro(self, m: int) -> range:
        return positions(m, self.bs, self.world, self.rank)


class StepBatches(_GlobalBatches):
    """Batch sampler of an iteration-based run (segment): for steps ``start .. iters - 1`` this rank's ``accum``
    micro-batches of ``(index, augmentation seed)`` pairs, a pure function of ``(seed, step, global_batch)`` and the
    rank's place (module docstring), so a run resumed at step ``start`` sees exactly the data an uninterrupted one
    would, and on another world size the same global batches."""

    def __init__(self, n: int, batch_size: int, iters: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0, *, global_batch: int | None = None):
        super().__init__(n, batch_size, seed, rank, world, global_batch)
        self.iters, self.start = iters, start

    def __len__(self) -> int:
        return max(0, self.iters - self.start) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, perm_epoch = [], -1
        for step in range(self.start, self.iters):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            first, base = k * self.g, (self.seed * SEED_STRIDE + step) * self.g  # the slice; the step's seeds
            for m in range(self.accum):
                yield [(perm[first + p], base + p) for p in self._micro(m)]


class EpochBatches(_GlobalBatches):
    """Batch sampler of one epoch of an epoch-based run (detect): this rank's ``accum`` micro-batches of item indices
    for optimizer steps ``start .. n // G - 1`` of ``epoch`` (module docstring), so a run resumed mid-epoch at
    optimizer step ``start`` continues with the same global batches on any world size."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start: int = 0, *, global_batch: int | None = None):
        super().__init__(n, batch_size, seed, rank, world, global_batch)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.per_epoch - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # DistributedSampler's own generator and seed
        perm = torch.randperm(self.n, generator=g).tolist()
        for k in range(self.start, self.per_epoch):
            for m in range(self.accum):
                yield [perm[k * self.g + p] for p in self._micro(m)]


__all__ = ["EpochBatches", "StepBatches", "accumulation", "positions"]

"""Labelled WebDataset shards -> (image tensor, class id) batches for fine-tuning, linear probing and eval.

Splitting invariant: in one epoch every sample of the shard directory is read by exactly one rank and,
inside the rank, by exactly one DataLoader worker. Ranks take samples by position in the (per-epoch,
identically shuffled on every rank) stream: sample ``i`` goes to rank ``i % world``. Inside a rank the
stream is cut into batches and batch ``j`` is built by worker ``j % num_workers``; because the PyTorch
DataLoader visits workers round-robin, batches come out in order and every worker count gives the same
batches. The epoch length is therefore defined by samples (``num_samples // world`` per rank, cut to
whole batches when training), never by the number of shards or workers.

Trade-off: every worker reads (but decodes only its own share of) all tar bytes. Reading a tar is
sequential and cheap next to JPEG decoding and augmentation; for very large datasets on many ranks a
shard-level split would cut the I/O, at the price of unequal per-rank counts.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset as _IterableDataset

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def list_shards(shard_dir: str | Path) -> list[Path]:
    """The ``*.tar`` shards of a directory in name order; ValueError when there are none."""
    shard_dir = Path(shard_dir)
    urls = sorted(shard_dir.glob("*.tar"))
    if not urls:
        raise ValueError(f"{shard_dir}: no *.tar shards found")
    return urls


def read_manifest(shard_dir: str | Path) -> dict[str, Any] | None:
    """The shard manifest (``<dir>/<split>.json`` with a ``shards`` list), or None when there is none."""
    for p in sorted(Path(shard_dir).glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("shards"), list):
            return data
    return None


def iter_tar_samples(url: str | Path) -> Iterator[dict[str, Any]]:
    """Group the members of one WebDataset tar into samples: ``{"__key__": k, ext: bytes, ...}``."""
    current: dict[str, Any] | None = None
    with tarfile.open(url, "r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = Path(m.name).name
            key, _, ext = name.partition(".")
            key = str(Path(m.name).parent / key)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext.lower()] = tf.extractfile(m).read()
    if current is not None:
        yield current


def count_samples(shard_dir: str | Path) -> int:
    """Number of samples: from the manifest when present, else by scanning the tars."""
    man = read_manifest(shard_dir)
    if man is not None:
        return sum(int(s["num_samples"]) for s in man["shards"])
    return sum(1 for url in list_shards(shard_dir) for _ in iter_tar_samples(url))


def num_classes_of(shard_dir: str | Path) -> int | None:
    """Class count from the manifest's ``classes`` (list or int), None when unknown."""
    man = read_manifest(shard_dir)
    if man is None or "classes" not in man:
        return None
    classes = man["classes"]
    return len(classes) if isinstance(classes, list | dict) else int(classes)


def decode_sample(sample: dict[str, Any]) -> tuple[Any, int]:
    """(RGB PIL image, class id) from a raw sample with an image entry and a ``cls`` entry."""
    from PIL import Image

    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None or "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')}: needs an image ({'/'.join(IMAGE_EXTS)}) and a cls entry")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return img, int(sample["cls"].decode("ascii").strip())


def _shuffle_buffer(stream: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for x in stream:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


class ClassifyShards(_IterableDataset):
    """An iterable dataset of ready batches ``(images [B,3,S,S] float, labels [B] int64)``.

    Use with ``DataLoader(ds, batch_size=None, num_workers=...)``; call :meth:`set_epoch` before each
    epoch (shuffling is a function of ``seed`` and the epoch, so a resumed run replays the same order).

    Args:
        shard_dir: directory of ``*.tar`` shards (samples with ``jpg`` and ``cls``).
        transform: PIL image -> tensor [3, S, S].
        batch_size: per-rank batch size.
        train: shuffle (shard order + buffer) and drop the last partial batch.
        rank, world: this process's position among the data-parallel ranks.
        seed: base seed of the shuffle.
        shuffle_buffer: samples held (as raw bytes) by the within-rank shuffle buffer.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        transform: Callable[[Any], Any],
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 2000,
    ):
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad split: batch_size={batch_size}, rank={rank}, world={world}")
        self.urls = list_shards(shard_dir)
        self.num_samples = count_samples(shard_dir)
        self.transform, self.batch_size, self.train = transform, batch_size, train
        self.rank, self.world, self.seed, self.shuffle_buffer = rank, world, seed, shuffle_buffer
        self.epoch = 0
        rank_samples = self.num_samples // world + int(rank < self.num_samples % world)
        if train:
            rank_samples = self.num_samples // world  # equal on every rank: DDP steps stay in lockstep
            if rank_samples < batch_size:
                raise ValueError(
                    f"{shard_dir}: {self.num_samples} samples over {world} rank(s) is fewer than one batch of "
                    f"{batch_size}; lower batch_size"
                )
        self.rank_samples = rank_samples

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.train:
            return self.rank_samples // self.batch_size
        return -(-self.rank_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_stream(self) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        if self.train:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(urls)  # same order on every rank
        stream = (
            s for i, s in enumerate(s for u in urls for s in iter_tar_samples(u)) if i % self.world == self.rank
        )
        if self.train:
            rng = random.Random((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)  # same in every worker
            stream = _shuffle_buffer(stream, self.shuffle_buffer, rng)
        return stream

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        import torch

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        total = len(self) * self.batch_size if self.train else self.rank_samples
        batch: list[tuple[Any, int]] = []
        for k, sample in enumerate(self._rank_stream()):
            if k >= total:
                break
            if (k // self.batch_size) % nw != wid:
                continue
            img, label = decode_sample(sample)
            batch.append((self.transform(img), label))
            if len(batch) == self.batch_size or k == total - 1:
                yield torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64)
                batch = []


def build_transform(
    input_size: int,
    *,
    train: bool,
    aa: str | None = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
):
    """SPEC §8 / §14.3 transforms built by timm ``create_transform``.

    Train: RandomResizedCrop(S, scale) bicubic, flip, RandAugment ``aa`` (timm disables colour jitter
    when RandAugment is on; with ``aa=None`` we pass ``color_jitter=None`` so there is none either),
    normalize, random erasing. Eval: resize the shorter side to S/0.875 (crop fraction 1.0 above 224),
    center crop S, normalize.
    """
    from timm.data import create_transform

    if train:
        tf = create_transform(
            input_size,
            is_training=True,
            scale=scale,
            hflip=hflip,
            color_jitter=None,
            auto_augment=aa or None,
            interpolation="bicubic",
            re_prob=reprob,
            re_mode=remode,
            re_count=recount,
        )
        _patch_posterize(tf)
        return tf
    crop_pct = 0.875 if input_size <= 224 else 1.0
    return create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)


def _posterize_keep_bits(img, bits_to_keep, **_):
    """timm's posterize, but ``bits_to_keep <= 0`` gives the all-black image older Pillow returned.

    'rand-m9-mstd0.5-inc1' draws magnitudes up to 10, where PosterizeIncreasing keeps 0 bits; Pillow >= 11
    raises on 0 bits, older Pillow (the reference's) zeroed every bit. We keep the reference behaviour.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    from timm.data.auto_augment import RandAugment, posterize

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize_keep_bits


def make_loader(ds: ClassifyShards, num_workers: int, pin_memory: bool = False):
    """DataLoader over a :class:`ClassifyShards` (batches are built by the dataset)."""
    from torch.utils.data import DataLoader

    nw = max(0, min(num_workers, len(ds)))
    return DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=pin_memory)

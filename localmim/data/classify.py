"""Labelled WebDataset shards -> (image tensor, class id) batches for fine-tuning, linear probing and evaluation.

Read by the one shard reader (:mod:`localmim.data.shards.stream`): every sample of the shard directory once per epoch
across ranks x DataLoader workers; training epochs are ``N // world // batch_size`` full batches on every rank
(shard order and buffer shuffled per ``(seed, epoch)``), evaluation reads every sample of the rank in order, the
last batch possibly partial. Transforms are timm's (:func:`build_transform`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from localmim.data.shards.manifest import IMAGE_EXTS, count_samples, num_classes_of, read_manifest, shard_set
from localmim.data.shards.stream import ShardLoader, ShardStream, decode_rgb, image_entry
from localmim.data.shards.tario import iter_samples as iter_tar_samples

__all__ = ["ClassifyShards", "build_transform", "count_samples", "decode_sample", "iter_tar_samples", "make_loader",
           "num_classes_of", "read_manifest"]


def decode_sample(sample: dict[str, Any]) -> tuple[Any, int]:
    """(RGB PIL image, class id) from a raw sample with an image entry and a ``cls`` entry."""
    if "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')}: no cls entry (a labelled "
                         f"sample needs an image ({'/'.join(IMAGE_EXTS)}) and a cls entry)")  # fmt: skip
    return decode_rgb(image_entry(sample)), int(sample["cls"])


class ClassifyShards(ShardStream):
    """Chunks ``(images [b,3,S,S] float, labels [b] int64)`` of one shard directory; iterate an epoch with
    ``make_loader(ds, num_workers)`` after :meth:`set_epoch` (``len(ds)`` batches on this rank).

    Args:
        shard_dir: directory of ``*.tar`` shards (samples with an image and ``cls``), with or without manifest.
        transform: PIL image -> tensor [3, S, S].
        batch_size: per-rank batch size.
        train: shuffle (shard order + buffer) and drop the left-over samples.
        rank, world: this process's position among the data-parallel ranks.
        seed: base seed of the shuffles.
        shuffle_buffer: samples held (as raw bytes) by each worker's shuffle buffer.
        global_batch, with_index: see :class:`~localmim.data.shards.stream.ShardStream`.
    """

    def __init__(self, shard_dir: str | Path, transform: Callable[[Any], Any], *, batch_size: int, train: bool,
                 rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 2000,
                 global_batch: int | None = None, with_index: bool = False):  # fmt: skip
        self.transform = transform
        sets = [shard_set(shard_dir)]
        try:
            super().__init__(sets, batch_size=batch_size, train=train, seed=seed, shuffle_buffer=shuffle_buffer,
                             rank=rank, world=world, global_batch=global_batch, with_index=with_index)  # fmt: skip
        except ValueError as e:
            raise ValueError(f"{shard_dir}: {e}") from None

    def decode(self, sample: dict[str, Any]) -> tuple[Any, int]:
        img, cls = decode_sample(sample)
        return self.transform(img), cls

    def collate(self, items: list[tuple[Any, int]]) -> tuple[Any, Any]:
        from torch.utils.data import default_collate

        return tuple(default_collate(items))  # images [b, 3, S, S], labels [b] int64


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
    """method §8 / §14.3 transforms built by timm ``create_transform``.

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


class _Epoch:
    """The current epoch of a dataset as an iterable with a length."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self.loader.epoch(self.loader.ds.epoch)


def make_loader(ds: ClassifyShards, num_workers: int, pin_memory: bool = False) -> _Epoch:
    """The batches of ``ds``'s current epoch (see :meth:`ClassifyShards.set_epoch`), read by ``num_workers``."""
    return _Epoch(ShardLoader(ds, num_workers, pin_memory))

"""Pretraining input: raw train shards with online augmentation, or precomputed view shards.

Both are read by the one shard reader (:mod:`localmim.data.shards.stream`: splitting across ranks and workers, epoch
length, shuffles, determinism). Every sample's augmentation is a function of ``(seed, epoch, sample key)`` only,
so it does not depend on the rank, worker or order that reads the sample, and a resumed run replays it.

Online augmentation (method §7): RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) then a horizontal flip
with p = 0.5, producing uint8 [3, S, S] tensors (the model normalises on device and computes HOG from uint8).
Views mode: epoch ``e`` reads view ``e mod K`` of the view shards written by :mod:`localmim.data.views`, each
sample a stored uint8 view plus its un-normalised finest-cell histograms (fp16).
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localmim.data.shards.manifest import VIEWS_MANIFEST, read_views_manifest, shard_set
from localmim.data.shards.stream import ShardLoader, ShardStream, decode_rgb, image_entry, rebatch

__all__ = ["VIEWS_MANIFEST", "PretrainLoader", "PretrainStream", "decode_image", "random_view", "read_views_manifest",
           "rebatch", "sample_crop", "sample_rng"]

SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


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
    """PIL image -> uint8 tensor [3, H, W] (converted to RGB only when it is not already: a convert is a copy)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def decode_image(sample: dict[str, Any]):
    """RGB PIL image of a raw sample (its first image member)."""
    return decode_rgb(image_entry(sample))


class PretrainStream(ShardStream):
    """Pretraining chunks: uint8 images ``[b, 3, S, S]`` (online) or ``(images, finest)`` tuples (views;
    ``finest`` only for HOG targets). Use through :class:`PretrainLoader`, which re-batches to exact batches.

    Args:
        source: raw train shard directory (online) or view shard directory (views).
        input_size: S of the views (online crop size; must match the view shards).
        batch_size: per-rank batch size.
        seed: base seed (shuffles and augmentation).
        shuffle_buffer: samples (raw bytes) held by each worker's shuffle buffer; 0 = no sample shuffle.
        resampled: draw shards with replacement (see :mod:`localmim.data.shards.stream`).
        rank, world: this process's data-parallel position.
        views: read view shards instead of raw shards.
        global_batch, with_index: see :class:`~localmim.data.shards.stream.ShardStream`.
    """

    def __init__(self, source: str | Path, *, input_size: int, batch_size: int, seed: int = 0,
                 shuffle_buffer: int = 1000, resampled: bool = False, rank: int = 0, world: int = 1,
                 views: bool = False, global_batch: int | None = None, with_index: bool = False):  # fmt: skip
        self.source, self.views, self.input_size = Path(source), views, input_size
        if views:
            man = read_views_manifest(source)
            if man["input_size"] != input_size:
                raise ValueError(f"{source}: views are {man['input_size']} px but input_size={input_size}")
            sets = [shard_set(self.source / d) for d in man["view_dirs"]]
        else:
            sets = [shard_set(self.source)]
        self.num_views = len(sets)
        try:
            super().__init__(sets, batch_size=batch_size, train=True, seed=seed, shuffle_buffer=shuffle_buffer,
                             resampled=resampled, rank=rank, world=world, global_batch=global_batch,
                             with_index=with_index)  # fmt: skip
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.views:
            hog = sample.get("hog.npy")
            hog = torch.from_numpy(np.load(io.BytesIO(hog), allow_pickle=False)) if hog is not None else None
            return pil_to_uint8(decode_rgb(sample["png"])), hog
        rng = sample_rng(self.seed, self.epoch, sample["__key__"])
        return random_view(decode_image(sample), self.input_size, rng)[0], None

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Any:
        from torch.utils.data import default_collate

        imgs = default_collate([x for x, _ in items])  # [b, 3, S, S] uint8
        if items[0][1] is None:
            return imgs
        return imgs, default_collate([t for _, t in items])  # [b, ...finest] fp16


class PretrainLoader(ShardLoader):
    """:class:`ShardLoader` of a :class:`PretrainStream`: exactly ``steps_per_epoch`` full batches per epoch,
    4 chunks prefetched per worker (the accelerator step is short next to a batch's decoding)."""

    def __init__(self, ds: PretrainStream, num_workers: int = 2, pin_memory: bool = False, prefetch_factor: int = 4):
        super().__init__(ds, num_workers, pin_memory, prefetch_factor)

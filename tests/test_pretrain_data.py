"""Pretraining input: splitting across ranks and workers, epoch length, determinism, the augmentation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from pretrain_helpers import make_shards
from torch.utils.data import DataLoader

from localmim.data.pretrain import PretrainLoader, PretrainStream, random_view, sample_crop, sample_rng
from localmim.data.shards.manifest import shard_set
from localmim.data.shards.stream import ShardLoader, ShardStream


class KeyStream(PretrainStream):
    """Decodes a sample to its integer key, so that the batches say which samples they hold."""

    def decode(self, sample):
        return torch.tensor(int(sample["__key__"])), None


def _keys_seen(shards, rank, world, workers, epoch=0, **kw):
    ds = KeyStream(shards, input_size=8, batch_size=2, seed=3, rank=rank, world=world, **kw)
    ds.set_epoch(epoch)
    dl = DataLoader(ds, batch_size=None, num_workers=workers)
    return [int(k) for chunk in dl for k in chunk]


@pytest.mark.parametrize("buffer", [0, 7])
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, buffer):
    keys = make_shards(tmp_path / "s", n=23, per_shard=4)  # 6 shards, uneven last one
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            mine = _keys_seen(tmp_path / "s", rank, 2, workers=2, epoch=epoch, shuffle_buffer=buffer)
            assert len(mine) in (11, 12)  # N // world or one more
            seen += mine
        assert Counter(seen) == Counter(int(k) for k in keys)


def test_ranks_get_equal_shares_with_unequal_worker_loads(tmp_path):
    # 3 shards over 2 workers: 14 vs 7 samples per worker; a per-worker rank split would give 8/7/6 and
    # desynchronise DDP (a rank with fewer than steps x batch samples)
    make_shards(tmp_path / "s", n=21, per_shard=7)
    for epoch in range(4):
        counts = [len(_keys_seen(tmp_path / "s", r, 3, workers=2, epoch=epoch, shuffle_buffer=0)) for r in range(3)]
        assert counts == [7, 7, 7]


def test_epoch_length_is_defined_by_samples(tmp_path):
    make_shards(tmp_path / "s", n=23, per_shard=4)
    lengths = []
    for world, workers in [(1, 0), (1, 2), (2, 0), (2, 2)]:
        for rank in range(world):
            ds = KeyStream(tmp_path / "s", input_size=8, batch_size=3, rank=rank, world=world)
            batches = list(PretrainLoader(ds, num_workers=workers).epoch(0))
            assert len(batches) == 23 // world // 3 and all(len(b) == 3 for b in batches)
            flat = torch.cat(batches).tolist()
            assert len(set(flat)) == len(flat)
            lengths.append(len(batches))
    assert lengths == [7, 7, 3, 3, 3, 3]


class KeyEval(ShardStream):
    """Evaluation-mode stream of integer keys (nothing decoded)."""

    def decode(self, sample):
        return torch.tensor(int(sample["__key__"]))

    def collate(self, items):
        return torch.stack(items)


def test_eval_reads_every_sample_once_with_a_partial_last_batch(tmp_path):
    make_shards(tmp_path / "s", n=23, per_shard=4)
    seen, sizes = [], []
    for rank in range(3):  # ranks hold 8, 8, 7 samples
        ds = KeyEval([shard_set(tmp_path / "s")], batch_size=3, train=False, rank=rank, world=3)
        batches = list(ShardLoader(ds, num_workers=2).epoch(0))
        assert len(batches) == len(ds)
        sizes.append([len(b) for b in batches])
        seen += torch.cat(batches).tolist()
    assert sizes == [[3, 3, 2], [3, 3, 2], [3, 3, 1]]
    assert sorted(seen) == list(range(23))


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    make_shards(tmp_path / "s", n=20, per_shard=4)
    a = _keys_seen(tmp_path / "s", 0, 1, workers=2, epoch=0, shuffle_buffer=5)
    b = _keys_seen(tmp_path / "s", 0, 1, workers=2, epoch=0, shuffle_buffer=5)
    c = _keys_seen(tmp_path / "s", 0, 1, workers=2, epoch=1, shuffle_buffer=5)
    assert a == b and a != c and sorted(a) == sorted(c)


def test_resampled_mode_draws_the_configured_epoch_length(tmp_path):
    make_shards(tmp_path / "s", n=20, per_shard=4)
    ds = KeyStream(tmp_path / "s", input_size=8, batch_size=4, resampled=True, rank=1, world=2)
    batches = list(PretrainLoader(ds, num_workers=2).epoch(0))
    assert len(batches) == 20 // 2 // 4
    assert all(0 <= k < 20 for b in batches for k in b.tolist())
    again = list(PretrainLoader(ds, num_workers=2).epoch(0))  # draws are seeded: the same epoch replays
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_mid_epoch_skip_replays_the_same_batches(tmp_path):
    make_shards(tmp_path / "s", n=20, per_shard=4)
    ds = PretrainStream(tmp_path / "s", input_size=16, batch_size=3, seed=1, shuffle_buffer=4)
    full = list(PretrainLoader(ds, num_workers=2).epoch(2))
    rest = list(PretrainLoader(ds, num_workers=2).epoch(2, skip=2))
    assert len(full) == 6 and len(rest) == 4
    assert all(torch.equal(x, y) for x, y in zip(full[2:], rest, strict=True))
    assert full[0].dtype == torch.uint8 and full[0].shape == (3, 3, 16, 16)


def test_bad_split_is_rejected(tmp_path):
    make_shards(tmp_path / "s", n=6, per_shard=3)
    with pytest.raises(ValueError, match="6 samples are fewer than one global batch of 8"):
        PretrainStream(tmp_path / "s", input_size=8, batch_size=4, world=2)
    with pytest.raises(ValueError, match="global_batch=6"):  # not a multiple of batch_size x world
        PretrainStream(tmp_path / "s", input_size=8, batch_size=2, world=2, global_batch=6)
    with pytest.raises(ValueError, match="rank=2"):
        PretrainStream(tmp_path / "s", input_size=8, batch_size=1, rank=2, world=2)


def test_crop_params_follow_the_spec_ranges():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = sample_crop(rng, 240, 240)
        assert 0 <= top and top + h <= 240 and 0 <= left and left + w <= 240
        areas.append(h * w / (240 * 240))
        ratios.append(w / h)
    # rounding to whole pixels moves the bounds by at most ~1 px per side
    assert 0.2 - 0.01 <= min(areas) < 0.25 and max(areas) <= 1.0 and max(areas) > 0.9
    assert 0.75 - 0.01 <= min(ratios) < 0.8 and 1.3 < max(ratios) <= 4 / 3 + 0.01
    # log-uniform aspect ratio: the median is near 1
    assert abs(math.log(np.median(ratios))) < 0.05


def test_random_view_equals_torchvision_resized_crop_and_flip():
    import torchvision.transforms.functional as F
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    arr = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    flips = 0
    for i in range(20):
        view, p = random_view(img, 24, sample_rng(0, i, "k"))
        ref = F.resized_crop(img, p["top"], p["left"], p["height"], p["width"], [24, 24], InterpolationMode.BICUBIC)
        if p["flip"]:
            ref = F.hflip(ref)
            flips += 1
        assert view.dtype == torch.uint8 and view.shape == (3, 24, 24)
        assert torch.equal(view, torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    assert 0 < flips < 20
    # the same (seed, epoch, key) gives the same view; another key a different one
    a, _ = random_view(img, 24, sample_rng(0, 0, "k"))
    b, _ = random_view(img, 24, sample_rng(0, 0, "k"))
    c, _ = random_view(img, 24, sample_rng(0, 0, "j"))
    assert torch.equal(a, b) and not torch.equal(a, c)

"""View shards: stored views and targets equal the online ones; manifest, epoch->view mapping, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_helpers import make_shards

from localmim.data.pretrain import PretrainLoader, PretrainStream, random_view, sample_rng
from localmim.data.shards.manifest import shard_set
from localmim.data.shards.stream import raw_samples
from localmim.data.views import ViewSpec, spec_from_model, targets_from_finest, write_views
from localmim.models import create

K = 3


def _read_view_dir(d: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in raw_samples(shard_set(d))}


def _uint8(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(png)))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    keys = make_shards(root / "shards", n=10, per_shard=4)
    model = create("localmim_vit_micro_patch8")
    out = {}
    for dtype in ("fp32", "fp16"):
        spec = spec_from_model(model, K, seed=5, dtype=dtype)
        write_views(root / "shards", root / dtype, spec, max_samples_per_shard=3, workers=1, log=lambda m: None)
        out[dtype] = root / dtype
    return root, keys, model, out


def test_stored_views_are_the_online_augmentation_of_epoch_k(built):
    root, keys, _, out = built
    raw = _read_view_dir(root / "shards")
    for k in range(K):
        stored = _read_view_dir(out["fp32"] / f"view-{k:02d}")
        assert sorted(stored) == sorted(keys)
        for key in keys[:4]:
            img = Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB")
            view, params = random_view(img, 32, sample_rng(5, k, key))
            assert torch.equal(_uint8(stored[key]["png"]), view)
            assert json.loads(stored[key]["json"]) == params


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 1e-3)])
def test_precomputed_targets_equal_online_targets(built, dtype, tol):
    _, keys, model, out = built
    for k in range(K):
        stored = _read_view_dir(out[dtype] / f"view-{k:02d}")
        images = torch.stack([_uint8(stored[key]["png"]) for key in keys])  # [N, 3, 32, 32]
        finest = torch.stack([torch.from_numpy(np.load(io.BytesIO(stored[key]["hog.npy"]))) for key in keys])
        assert finest.dtype == (torch.float16 if dtype == "fp16" else torch.float32)
        pre = targets_from_finest(finest, model.hog_nbins, model.target_cells)
        online = model.compute_targets(images)
        assert len(pre) == len(online) == 4
        for a, b in zip(pre, online, strict=True):
            assert a.shape == b.shape
            if tol == 0:
                assert torch.equal(a, b)
            else:
                # fp16 keeps 11 significant bits of each cell mean: <= 2^-11 relative before normalisation
                assert (a - b).abs().max().item() <= tol


def test_manifest_counts_and_checksums(built):
    _, keys, _, out = built
    man = json.loads((out["fp16"] / "views.json").read_text())
    assert man["views"] == K and man["num_samples"] == len(keys) and man["input_size"] == 32
    assert man["cells"] == [2, 4, 8, 16] and man["hog_shape"] == [27, 16, 16] and man["dtype"] == "fp16"
    total = 0
    for d in man["view_dirs"]:
        shards = json.loads((out["fp16"] / d / f"{d}.json").read_text())["shards"]
        assert sum(s["num_samples"] for s in shards) == len(keys)
        assert [s["num_samples"] for s in shards] == [3, 3, 3, 1]
        for s in shards:
            data = (out["fp16"] / d / s["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
            total += len(data)
    assert man["total_bytes"] == total
    assert not list(out["fp16"].parent.glob(".*tmp*"))


def test_epoch_e_reads_view_e_mod_k(built):
    _, keys, model, out = built
    ds = PretrainStream(out["fp16"], input_size=32, batch_size=5, views=True, shuffle_buffer=0)
    for epoch in (1, 4):
        stored = _read_view_dir(out["fp16"] / f"view-{epoch % K:02d}")
        want = {bytes(_uint8(s["png"]).numpy()) for s in stored.values()}
        got = set()
        for images, finest in PretrainLoader(ds, num_workers=0).epoch(epoch):
            assert images.dtype == torch.uint8 and finest.shape == (5, 27, 16, 16)
            got |= {bytes(x.numpy()) for x in images}
        assert got == want


def test_parallel_workers_write_the_same_samples(built, tmp_path):
    root, keys, model, out = built
    spec = spec_from_model(model, K, seed=5, dtype="fp16")
    write_views(root / "shards", tmp_path / "v", spec, max_samples_per_shard=3, workers=2, log=lambda m: None)
    for k in range(K):
        a, b = _read_view_dir(out["fp16"] / f"view-{k:02d}"), _read_view_dir(tmp_path / "v" / f"view-{k:02d}")
        assert sorted(a) == sorted(b)
        assert all(a[key]["png"] == b[key]["png"] and a[key]["hog.npy"] == b[key]["hog.npy"] for key in a)


def test_failure_leaves_no_partial_output(tmp_path):
    import webdataset as wds

    make_shards(tmp_path / "s", n=4, per_shard=4)
    with wds.TarWriter(str(tmp_path / "s" / "train-000009.tar")) as w:
        w.write({"__key__": "bad", "jpg": b"not a jpeg", "cls": b"0"})
    (tmp_path / "s" / "train.json").unlink()  # scan all tars, the bad one included
    spec = ViewSpec(2, 0, 32, "hog", 9, (2, 4, 8, 16))
    with pytest.raises(Exception, match="cannot identify image"):
        write_views(tmp_path / "s", tmp_path / "v", spec, log=lambda m: None)
    assert not (tmp_path / "v").exists() and not list(tmp_path.glob(".v*"))


def test_hog_bias_cannot_be_precomputed():
    model = create("localmim_vit_micro_patch8", hog_bias=True)
    with pytest.raises(ValueError, match="hog_bias"):
        spec_from_model(model, 2, 0, "fp16")

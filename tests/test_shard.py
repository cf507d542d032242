"""ImageFolder -> WebDataset shards: every kind of bad input, the found = written + skipped invariant,
byte-identical re-runs, limits, timm's reader, MLflow, and interruption at a random moment."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localmim.data import shards as sh
from localmim.data import tario
from localmim.data.manifest import read_manifest, shard_set
from tests.conftest import ROOT, cli_env, run_cli

PARAMS = str(ROOT / "params.yaml")


def _jpeg(rng: np.random.Generator, w: int, h: int, mode: str = "RGB", quality: int = 90) -> bytes:
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(rng: np.random.Generator) -> bytes:
    """A valid small JPEG whose SOF header claims 60000 x 50000 pixels."""
    data = bytearray(_jpeg(rng, 16, 16))
    i = data.index(b"\xff\xc0")  # baseline SOF0: marker, length(2), precision(1), height(2), width(2)
    data[i + 5 : i + 9] = (50000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    return bytes(data)


def make_good_folder(root: Path, classes: int = 3, per_class: int = 5, seed: int = 0) -> dict[str, int]:
    """RGB JPEGs of varying size; returns {relative path: class index}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for c in range(classes):
        d = root / f"n{c:08d}_cls{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"img_{i:03d}.JPEG").write_bytes(_jpeg(rng, int(rng.integers(20, 64)), int(rng.integers(20, 64))))
            truth[f"{d.name}/img_{i:03d}.JPEG"] = c
    return truth


# relative path -> expected skip reason prefix (None = written); the empty class "n9_empty" sorts last
BAD = {
    "n00000000_cls0/truncated.JPEG": "truncated JPEG: image file is truncated",
    "n00000000_cls0/zero.JPEG": "zero-byte file",
    "n00000000_cls0/header_cut.JPEG": "truncated JPEG: ",
    "n00000001_cls1/text.JPEG": "not an image: cannot identify image file",
    "n00000001_cls1/bomb.JPEG": "decompression bomb: 60000x50000 px > limit",
    "n00000002_cls2/locked.JPEG": "unreadable file: Permission denied",
    "n00000001_cls1/png_named.JPEG": None,
    "n00000002_cls2/cmyk.JPEG": None,
    "n00000002_cls2/gray.JPEG": None,
    "n00000002_cls2/ünïcödé_名前.JPEG": None,
}
REENCODED = {"n00000001_cls1/png_named.JPEG": "PNG file", "n00000002_cls2/cmyk.JPEG": "CMYK JPEG",
             "n00000002_cls2/gray.JPEG": "L JPEG"}  # fmt: skip


def make_bad_folder(root: Path) -> dict[str, int]:
    truth = make_good_folder(root)
    rng = np.random.default_rng(1)
    good = _jpeg(rng, 200, 160)  # cut in the middle of the entropy-coded data
    files = {
        "n00000000_cls0/truncated.JPEG": good[: len(good) // 2],
        "n00000000_cls0/zero.JPEG": b"",
        "n00000000_cls0/header_cut.JPEG": good[:300],  # cut inside the header tables
        "n00000001_cls1/text.JPEG": b"this is not an image\n",
        "n00000001_cls1/bomb.JPEG": _bomb(rng),
        "n00000002_cls2/locked.JPEG": _jpeg(rng, 30, 30),
        "n00000001_cls1/png_named.JPEG": _png(rng, 33, 21),
        "n00000002_cls2/cmyk.JPEG": _jpeg(rng, 40, 24, "CMYK"),
        "n00000002_cls2/gray.JPEG": _jpeg(rng, 24, 40, "L"),
        "n00000002_cls2/ünïcödé_名前.JPEG": _jpeg(rng, 26, 26),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
        truth[rel] = int(rel.split("/")[0][-1])
    (root / "n9_empty").mkdir()
    (root / "n00000000_cls0" / "README.txt").write_text("not an image extension: ignored, not found\n")
    return truth


def _lock(monkeypatch, name: str = "locked.JPEG") -> None:
    """Tests run as root (chmod 000 would not stop reading): simulate the OS error of an unreadable file."""
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def read_tars(out: Path, split: str = "train") -> list[dict]:
    """All samples of a split, read with the standard library (independent of webdataset), in shard order."""
    samples = []
    for tar in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
            for m in members:
                assert (m.mtime, m.uid, m.gid, m.mode, m.uname) == (0, 0, 0, 0o444, "localmim")
            by_key: dict[str, dict] = {}
            for m in members:
                key, ext = m.name.split(".", 1)
                by_key.setdefault(key, {"__key__": key, "__shard__": tar.name})[ext] = tf.extractfile(m).read()
        samples.extend(by_key.values())
    return samples


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tar_digests(out: Path, split: str = "train") -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(out.glob(f"{split}-*.tar"))}


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_skipped_or_reencoded_and_invariant(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    truth = make_bad_folder(src)
    _lock(monkeypatch)
    warnings: list[str] = []
    man = sh.write_shards(src, out, "train", sh.ShardOptions(max_samples_per_shard=4, workers=1), progress=False,
                          warn=warnings.append)  # fmt: skip

    # invariant: files found = samples written + files skipped (README.txt has no image extension: not found)
    assert man["num_found"] == len(truth) == 25
    assert man["num_samples"] + man["num_skipped"] == man["num_found"]
    assert man["ignored"] == ["n00000000_cls0/README.txt"]
    skipped = {s["path"]: s["reason"] for s in man["skipped"]}
    assert skipped.keys() == {k for k, v in BAD.items() if v is not None}
    for path, reason in skipped.items():
        assert reason.startswith(BAD[path]), (path, reason)
    assert man["reencoded"] == {"CMYK JPEG": 1, "L JPEG": 1, "PNG file": 1}

    # classes: sorted directory names -> index; the empty class keeps its index, with a warning
    assert man["classes"] == {"n00000000_cls0": 0, "n00000001_cls1": 1, "n00000002_cls2": 2, "n9_empty": 3}
    assert man["class_counts"]["n9_empty"] == 0
    assert any("n9_empty" in w and "no images" in w for w in warnings)
    assert any(w.startswith("skipped 6 of 25 files") for w in warnings)
    assert man["warnings"] == warnings

    # every written sample: right class, original path, original bytes when already an RGB JPEG
    samples = read_tars(out)
    assert len(samples) == man["num_samples"] == sum(s["num_samples"] for s in man["shards"]) == 19
    assert len({s["__key__"] for s in samples}) == len(samples)
    seen = set()
    for s in samples:
        meta = json.loads(s["json"])
        rel = meta["path"]
        seen.add(rel)
        assert int(s["cls"].decode("ascii")) == truth[rel] == meta["cls"]
        assert meta["class"] == rel.split("/")[0]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        img.load()
        if rel in REENCODED:
            assert meta["reencoded"] == REENCODED[rel]
            ref = np.asarray(Image.open(src / rel).convert("RGB"), dtype=np.float64)
            assert np.abs(np.asarray(img, dtype=np.float64) - ref).mean() < 4  # same picture, re-encoded
        else:
            assert s["jpg"] == (src / rel).read_bytes()
    assert seen == {k for k in truth if k not in skipped}

    # manifest shard records agree with the files (independent sha256 / size)
    for rec in man["shards"]:
        p = out / rec["name"]
        assert rec["sha256"] == sha(p) and rec["bytes"] == p.stat().st_size
        assert rec["num_samples"] == sum(1 for s in samples if s["__shard__"] == rec["name"]) <= 4
    assert json.loads((out / "train.json").read_text()) == man


def test_cli_skip_warns_and_exits_0(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_bad_folder(src)
    (src / "n00000002_cls2" / "locked.JPEG").unlink()  # (the OS error is simulated in-process only)
    p = run_cli("shard", str(src), str(out), "--split", "train", "--params", PARAMS, cwd=tmp_path,
                LOCALMIM_TRACKING="0")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "warning: skipped 5 of 24 files" in p.stderr
    assert "warning: class 'n9_empty' (index 3) has no images" in p.stderr
    assert "img/s" in p.stderr  # progress bar
    man = json.loads((out / "train.json").read_text())
    assert man["num_found"] == man["num_samples"] + man["num_skipped"] == 24


@pytest.mark.parametrize("bad", ["truncated.JPEG", "header_cut.JPEG", "zero.JPEG", "text.JPEG", "bomb.JPEG"])
def test_cli_fail_names_file_and_problem(tmp_path, bad, capsys, monkeypatch):
    from localmim.cli import main

    monkeypatch.setenv("LOCALMIM_TRACKING", "0")
    src, out = tmp_path / "src", tmp_path / "out"
    make_bad_folder(src)
    for rel in BAD:
        if BAD[rel] is not None and not rel.endswith(bad):
            (src / rel).unlink()
    argv = ["shard", str(src), str(out), "--split", "val", "--on-bad", "fail", "--max-samples-per-shard", "3",
            "--params", PARAMS]  # fmt: skip
    assert main(argv) == 1
    rel = next(r for r in BAD if r.endswith(bad))
    assert f"localmim shard: error: {src / rel}: {BAD[rel]}" in capsys.readouterr().err
    assert not (out / "val.json").exists()  # nothing looks complete
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # and no temp files are left


def test_cli_fail_exit_code_from_a_real_process(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_good_folder(src, classes=2, per_class=2)
    (src / "n00000001_cls1" / "empty.JPEG").write_bytes(b"")
    p = run_cli("shard", str(src), str(out), "--split", "train", "--on-bad", "fail", "--params", PARAMS,
                cwd=tmp_path, LOCALMIM_TRACKING="0")  # fmt: skip
    assert p.returncode == 1
    assert f"{src / 'n00000001_cls1' / 'empty.JPEG'}: zero-byte file" in p.stderr
    assert not list(out.glob("*.tar")) and not (out / "train.json").exists()


def test_unreadable_file_fails_with_os_error(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_good_folder(src)
    (src / "n00000001_cls1" / "locked.JPEG").write_bytes(b"\xff\xd8")
    _lock(monkeypatch)
    with pytest.raises(sh.BadImageError, match=r"locked\.JPEG: unreadable file: Permission denied"):
        sh.write_shards(src, tmp_path / "out", "train", sh.ShardOptions(workers=1, on_bad="fail"), progress=False)


def test_pixel_limit_is_an_option(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, classes=2, per_class=3)
    man = sh.write_shards(src, tmp_path / "out", "train", sh.ShardOptions(max_pixels=30 * 30, workers=1),
                          progress=False)  # fmt: skip
    sizes = {rel: Image.open(src / rel).size for rel in (s["path"] for s in man["skipped"])}
    assert sizes and all(w * h > 900 for w, h in sizes.values())
    assert man["num_samples"] == sum(1 for p in src.rglob("*.JPEG") if np.prod(Image.open(p).size) <= 900)


# ---------------------------------------------------------------------------------------------------- determinism


def test_rerun_and_worker_count_give_byte_identical_shards(tmp_path):
    src = tmp_path / "src"
    make_bad_folder(src)
    opts = dict(max_samples_per_shard=5, seed=3)
    a = sh.write_shards(src, tmp_path / "a", "train", sh.ShardOptions(workers=1, **opts), progress=False)
    sh.write_shards(src, tmp_path / "b", "train", sh.ShardOptions(workers=2, **opts), progress=False)
    assert len(a["shards"]) == 4
    assert tar_digests(tmp_path / "a") == tar_digests(tmp_path / "b")
    # re-run into the same directory, with a stale temp file and an extra old shard lying around
    (tmp_path / "a" / ".train-000001.tar.tmp-99999").write_bytes(b"partial")
    (tmp_path / "a" / "train-000009.tar").write_bytes(b"old")
    c = sh.write_shards(src, tmp_path / "a", "train", sh.ShardOptions(workers=2, **opts), progress=False)
    assert c["shards"] == a["shards"]
    assert tar_digests(tmp_path / "a") == tar_digests(tmp_path / "b")
    assert not [f for f in (tmp_path / "a").iterdir() if f.name.startswith(".")]


def test_seed_shuffles_across_shards(tmp_path):
    src = tmp_path / "src"
    truth = make_good_folder(src, classes=3, per_class=6)
    order = {}
    for seed in (0, 1):
        sh.write_shards(src, tmp_path / f"s{seed}", "train", sh.ShardOptions(seed=seed, workers=1), progress=False)
        order[seed] = [json.loads(s["json"])["path"] for s in read_tars(tmp_path / f"s{seed}")]
    assert sorted(order[0]) == sorted(order[1]) == sorted(truth)
    assert order[0] != order[1] and order[0] != sorted(truth)
    first_six = [truth[p] for p in order[0][:6]]
    assert len(set(first_six)) > 1  # classes are mixed, not one class after the other


def test_shard_limits_and_max_side(tmp_path):
    src = tmp_path / "src"
    make_good_folder(src, classes=2, per_class=8)
    limit = 16 * 1024
    man = sh.write_shards(src, tmp_path / "o", "train", sh.ShardOptions(max_shard_bytes=limit, max_side=32,
                          workers=1), progress=False)  # fmt: skip
    sizes = [(tmp_path / "o" / s["name"]).stat().st_size for s in man["shards"]]
    assert len(sizes) > 1 and all(b <= limit for b in sizes)
    assert man["options"]["max_side"] == 32
    for s in read_tars(tmp_path / "o"):
        meta = json.loads(s["json"])
        w0, h0 = Image.open(src / meta["path"]).size
        w, h = Image.open(io.BytesIO(s["jpg"])).size
        if max(w0, h0) > 32:
            assert max(w, h) == 32 and abs(w / h - w0 / h0) < 0.1 and meta["reencoded"] == "downscaled"
        else:
            assert (w, h) == (w0, h0) and s["jpg"] == (src / meta["path"]).read_bytes()
    with pytest.raises(ValueError, match="on_bad='maybe'"):
        sh.ShardOptions(on_bad="maybe")


# ---------------------------------------------------------------------------------------------------- readers


def test_timm_wds_reader_and_pipeline_read_every_sample(tmp_path):
    import timm.data

    src, out = tmp_path / "src", tmp_path / "out"
    truth = make_good_folder(src, classes=3, per_class=7)
    sh.write_shards(src, out, "val", sh.ShardOptions(max_samples_per_shard=4, workers=1), progress=False)
    ds = timm.data.create_dataset("wds/localmim", root=str(out), split="val", is_training=False)
    got = [(img.mode, t) for img, t in ds]
    assert len(got) == len(ds) == 21
    assert Counter(t for _, t in got) == Counter(truth.values()) and {m for m, _ in got} == {"RGB"}

    # the project's reader (the one used by fine-tuning / linear probing), 2 workers, 2 ranks
    import torch

    from localmim.data.classify import ClassifyShards, make_loader

    labels = []
    for rank in (0, 1):
        ds = ClassifyShards(out, lambda im: torch.tensor(im.size), batch_size=4, train=False, rank=rank, world=2)
        labels += [int(y) for _, ys in make_loader(ds, 2) for y in ys]
    assert Counter(labels) == Counter(truth.values())
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_manifest(out, "train")


# ---------------------------------------------------------------------------------------------------- tracking


def test_mlflow_run_is_recorded(tmp_path, monkeypatch):
    import mlflow

    from localmim.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    make_bad_folder(src)
    (src / "n00000002_cls2" / "locked.JPEG").unlink()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shard-test")
    monkeypatch.delenv("LOCALMIM_TRACKING", raising=False)
    assert main(["shard", str(src), str(out), "--split", "train", "--workers", "1", "--params", PARAMS]) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["shard-test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["stage"] == "shard_train" and run.data.tags["git_commit"]
    assert len(run.data.tags["params_hash"]) == 12
    assert run.data.metrics["num_samples"] == 19 and run.data.metrics["num_skipped"] == 5
    assert run.data.params["workers"] == "1"
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "train.json" in arts


# ---------------------------------------------------------------------------------------------------- interruption


def test_kill_midway_leaves_nothing_that_looks_complete(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(5)
    for c in range(2):
        d = src / f"c{c}"
        d.mkdir(parents=True)
        for i in range(120):  # re-encoded (PNG, downscaled): slow enough to be killed midway
            (d / f"{i:04d}.JPEG").write_bytes(_png(rng, 128, 128))
    args = ["shard", str(src), "OUT", "--split", "train", "--workers", "1", "--max-samples-per-shard", "8",
            "--max-side", "64", "--params", PARAMS]  # fmt: skip
    ref = tmp_path / "ref"
    assert run_cli(*[str(ref) if a == "OUT" else a for a in args], cwd=tmp_path, LOCALMIM_TRACKING="0").returncode == 0
    assert len(tar_digests(ref)) == 30

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "localmim.cli", *[str(out) if a == "OUT" else a for a in args]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(LOCALMIM_TRACKING="0"), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "train-000002.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert not (out / "train.json").exists() and "train" not in sh._read_info(out).get("splits", {})
    done = tar_digests(out)
    assert 3 <= len(done) < 30
    assert all(done[n] == tar_digests(ref)[n] for n in done)  # every *.tar present is a complete, final shard
    assert all(".tmp-" in f.name for f in out.iterdir() if f.name.startswith("."))  # partial work: temp names

    p = run_cli(*[str(out) if a == "OUT" else a for a in args], cwd=tmp_path, LOCALMIM_TRACKING="0")
    assert p.returncode == 0, p.stderr
    assert tar_digests(out) == tar_digests(ref)
    assert not [f for f in out.iterdir() if f.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------- tar reader


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "PAX_FORMAT", "GNU_FORMAT"])
def test_fast_tar_reader_matches_tarfile(tmp_path, fmt):
    """The tar reader against the standard library on long, prefixed and non-ASCII names (PAX / GNU headers)."""
    rng = np.random.default_rng(0)
    names = ["a/k1.jpg", "a/k1.json", "k2.cls", "d" * 90 + "/" + "e" * 60 + ".jpg", "ünï/名前.txt",
             "x" * 120 + ".json", "empty.bin"]  # fmt: skip
    if fmt == "USTAR_FORMAT":
        names = [n for n in names if n.isascii() and len(n.rsplit("/", 1)[-1]) <= 100 and len(n) < 250][:-2]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tf:
        if fmt != "USTAR_FORMAT":
            d = tarfile.TarInfo("dir_entry")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)  # not a file: skipped by both readers
        for n in names:
            data = rng.bytes(int(rng.integers(0, 3000))) if n != "empty.bin" else b""
            ti = tarfile.TarInfo(n)
            ti.size, ti.mtime = len(data), 1.5 if fmt == "PAX_FORMAT" else 0
            tf.addfile(ti, io.BytesIO(data))
    with tarfile.open(path) as tf:
        ref = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    assert list(tario.iter_tar_members(path)) == ref
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        list(tario.iter_tar_members(path))


def test_header_checksum_agrees_with_tarfile_for_up_to_256_changed_bytes():
    """The C-speed checksum (adler32's byte sum, modulo 65521) decides as the standard library's full byte sum
    (``tarfile.calc_chksums``) on headers with 1..256 changed bytes, including permuted bytes (the sum kept), which
    both must accept; its documented blind spot, a 257+-byte change of exactly 65521, is the one it passes."""
    rng = np.random.default_rng(0)
    ti = tarfile.TarInfo("n01440764/n01440764_10026.jpg")
    ti.size = 123_456
    good = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")

    def full_sum_ok(hdr: bytes) -> bool:
        return tarfile.nti(hdr[148:156]) in tarfile.calc_chksums(hdr)[:1]  # unsigned sum, as tar writes it

    assert full_sum_ok(good) and tario._checksum_ok(good)
    decided = Counter()
    for k in [1, 2, 3, 8, 64, 256] * 40:
        hdr = bytearray(good)
        at = rng.choice(np.r_[0:148, 156:512], size=k, replace=False)
        if rng.random() < 0.3:  # permute the chosen bytes: the sum is kept, both must accept
            for i, j in zip(at, rng.permutation(at), strict=True):
                hdr[i] = good[j]
        else:
            hdr[at[0]] = (hdr[at[0]] + int(rng.integers(1, 256))) % 256
            for i in at[1:]:
                hdr[i] = int(rng.integers(0, 256))
        decided[full_sum_ok(bytes(hdr))] += 1
        assert tario._checksum_ok(bytes(hdr)) == full_sum_ok(bytes(hdr)), (k, at[:4])
    assert decided[True] > 10 and decided[False] > 100  # both outcomes were exercised
    blind = bytearray(good)
    zeros = [i for i in range(512) if good[i] == 0 and not 148 <= i < 156][:257]
    for i in zeros:  # 257 bytes 0 -> 255, one of them 0 -> 241: the sum grows by 257 * 255 - 14 = 65521
        blind[i] = 255
    blind[zeros[0]] = 241
    assert not full_sum_ok(bytes(blind)) and tario._checksum_ok(bytes(blind))


def test_samples_from_our_shards_match_tarfile(tmp_path):
    from localmim.data.stream import raw_samples

    src, out = tmp_path / "src", tmp_path / "out"
    make_good_folder(src, classes=2, per_class=4)
    sh.write_shards(src, out, "train", sh.ShardOptions(max_samples_per_shard=3, workers=1), progress=False)
    ours = [{k: v for k, v in s.items() if k != "__url__"} for s in raw_samples(shard_set(out, "train"))]
    ref = [{k: v for k, v in s.items() if k != "__shard__"} for s in read_tars(out)]
    assert ours == ref and len(ref) == 8


def test_shard_sink_matches_webdataset_tarwriter(tmp_path):
    """Our writer's bytes equal webdataset's TarWriter with the same fixed metadata, and roll over at limits."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i:03d}", "jpg": rng.bytes(int(rng.integers(1, 3000))), "cls": b"%d" % i}
               for i in range(7)]  # fmt: skip
    with tario.ShardSink(tmp_path, "s", max_samples=3) as sink:
        for x in samples:
            sink.write(tario.tar_members(x["__key__"], {k: v for k, v in x.items() if k != "__key__"}))
    assert [r["num_samples"] for r in sink.shards] == [3, 3, 1]
    for r, start in zip(sink.shards, (0, 3, 6), strict=True):
        ref = tmp_path / f"ref-{start}.tar"
        with wds.TarWriter(str(ref), user="localmim", group="localmim", mtime=0) as w:
            for x in samples[start : start + 3]:
                w.write(x)
        mine = (tmp_path / r["name"]).read_bytes()
        assert mine == ref.read_bytes() and r["bytes"] == len(mine)
        assert r["sha256"] == hashlib.sha256(mine).hexdigest()


def test_ordered_map_keeps_order_and_bounds_work_in_flight():
    """Memory independent of dataset size: the pool never runs more than the window ahead of the consumer."""
    consumed = 0

    def items():
        nonlocal consumed
        for i in range(400):
            consumed += 1
            yield i

    ahead = []
    for k, r in enumerate(sh._ordered_map(abs, items(), workers=2, window=32, chunksize=4)):
        assert r == k
        ahead.append(consumed - k)
    assert max(ahead) <= 32 + 1 and consumed == 400


def test_output_inside_source_is_refused(tmp_path):
    make_good_folder(tmp_path / "src", classes=2, per_class=1)
    with pytest.raises(ValueError, match="inside the ImageFolder"):
        sh.write_shards(tmp_path / "src", tmp_path / "src" / "shards", "train", sh.ShardOptions(), progress=False)


def test_ordered_map_stops_cleanly_when_the_consumer_stops_early():
    """on_bad=fail stops consuming mid-stream: the pool must shut down, not wait for the throttled feeder."""
    import threading

    done = threading.Event()

    def run():
        g = sh._ordered_map(abs, iter(range(100_000)), workers=2, window=16, chunksize=2)
        assert [r for _, r in zip(range(5), g, strict=False)] == [0, 1, 2, 3, 4]
        g.close()
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert done.is_set(), "pool shutdown hung"

"""ImageFolder -> WebDataset shards: every kind of bad input, the found = written + skipped invariant,
byte-identical re-runs, limits, timm's reader, MLflow, and interruption at a random moment (the tar reader and
writer underneath: test_tario.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from localmim.data.shards import write as sh
from localmim.data.shards.manifest import read_manifest
from tests.conftest import ROOT, cli_env, run_cli
from tests.shard_data import (
    BAD,
    REENCODED,
    _lock,
    _png,
    make_bad_folder,
    make_good_folder,
    read_tars,
    sha,
    tar_digests,
)

PARAMS = str(ROOT / "params.yaml")


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


def test_output_inside_source_is_refused(tmp_path):
    make_good_folder(tmp_path / "src", classes=2, per_class=1)
    with pytest.raises(ValueError, match="inside the ImageFolder"):
        sh.write_shards(tmp_path / "src", tmp_path / "src" / "shards", "train", sh.ShardOptions(), progress=False)

"""Raw dataset manifests (``localmim dataset``) and ImageNet's flat validation layout.

The manifest is checked against an independent walk of the tree (counts, sizes, mtimes, hashlib digests), its
promise not to read image bytes with ``open`` forbidden on images, and its fingerprint against touched, added,
removed and rewritten files. The flat val folder, with each kind of ground truth, must give the samples of the
class-folder layout of the same images.
"""

from __future__ import annotations

import builtins
import csv
import gzip
import hashlib
import json
import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

from localmim.data.raw import datasets as ds
from localmim.data.raw.datasets import DatasetError, write_manifest
from localmim.data.raw.imagenet_val import LabelsError, read_val_labels, scan_flat_val, scan_imagenet_split
from localmim.data.shards.write import ShardOptions, write_shards
from localmim.synth.datasets import write_ade20k, write_coco, write_imagenet

TINY = dict(min_side=32, max_side=40, quality=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """ImageNet (3 classes, 2 train + 3 val each), ADE20K and COCO layouts, written once (tests copy what they edit)."""
    root = tmp_path_factory.mktemp("raw")
    write_imagenet(root / "imagenet", seed=3, num_classes=3, per_class={"train": 2, "val": 3}, **TINY)
    write_ade20k(root / "ade20k", seed=3, num_classes=2, sizes={"train": 2, "val": 1}, **TINY)
    write_coco(root / "coco", seed=3, num_classes=2, sizes={"train": 2, "val": 1}, **TINY)
    return root


def _walk(root: Path) -> dict[str, os.stat_result]:
    return {p.relative_to(root).as_posix(): p.stat() for p in root.rglob("*") if p.is_file()}


def _rows(out: Path, name: str) -> list[list[str]]:
    with gzip.open(out / f"{name}.files.tsv.gz", "rt") as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


def test_manifest_matches_an_independent_walk_without_opening_an_image(tree, tmp_path, monkeypatch):
    real_open = builtins.open

    def guarded(file, *a, **k):
        if str(file).lower().endswith(ds.IMAGE_SUFFIXES):
            raise AssertionError(f"image opened: {file}")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    for name in ds.NAMES:
        man = write_manifest(name, str(tree / name), tmp_path, what=f"datasets.{name}")
        walk = _walk(tree / name)
        rows = _rows(tmp_path, name)
        assert [r[0] for r in rows] == sorted(walk)  # every file the stages read, and nothing else here
        assert all(int(s) == walk[p].st_size and int(m) == walk[p].st_mtime_ns for p, s, m in rows)
        assert man["num_files"] == len(walk) and man["total_bytes"] == sum(s.st_size for s in walk.values())
        assert json.loads((tmp_path / f"{name}.json").read_text()) == man
    monkeypatch.undo()
    man = json.loads((tmp_path / "imagenet.json").read_text())
    for split, n in (("train", 2), ("val", 3)):
        classes = sorted(d.name for d in (tree / "imagenet" / split).iterdir())
        assert man["splits"][split]["class_counts"] == dict.fromkeys(classes, n)
        assert man["splits"][split]["layout"] == "classes"
    coco = json.loads((tmp_path / "coco.json").read_text())["splits"]
    assert coco["val"]["num_images"] == 1 and coco["train"]["annotations"] == "annotations/instances_train2017.json"
    ade = json.loads((tmp_path / "ade20k.json").read_text())["splits"]
    assert ade["train"]["num_images"] == ade["train"]["num_annotations"] == 2


def test_fingerprint_follows_every_change_and_only_changes(tree, tmp_path):
    root = shutil.copytree(tree / "imagenet", tmp_path / "imagenet")
    out = tmp_path / "out"

    def write() -> tuple[bytes, bytes]:
        write_manifest("imagenet", str(root), out)
        return (out / "imagenet.json").read_bytes(), (out / "imagenet.files.tsv.gz").read_bytes()

    first = write()
    assert write() == first  # unchanged: byte-identical outputs, so nothing downstream reruns
    img = next((root / "train").rglob("*.JPEG"))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = write()
    assert touched[0] != first[0]
    shutil.copy(img, img.with_name("extra.JPEG"))
    added = write()
    assert json.loads(added[0])["num_files"] == json.loads(first[0])["num_files"] + 1
    img.with_name("extra.JPEG").unlink()
    assert write()[0] == touched[0]  # removing the added file is back to the touched state

    # Same size, bytes rewritten, mtime restored: invisible to stat (a documented limit), seen by content mode.
    data = bytearray(img.read_bytes())
    data[-3] ^= 0xFF
    before = img.stat()
    img.write_bytes(bytes(data))
    os.utime(img, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert write()[0] == touched[0]
    content = write_manifest("imagenet", str(root), out, mode="content")
    shas = {r[0]: r[3] for r in _rows(out, "imagenet")}
    assert shas[img.relative_to(root).as_posix()] == hashlib.sha256(bytes(data)).hexdigest()
    assert content["fingerprint_mode"] == "content" and content["fingerprint"] != json.loads(touched[0])["fingerprint"]


def test_content_mode_hashes_only_new_files_and_ignores_mtime(tree, tmp_path, monkeypatch):
    root = shutil.copytree(tree / "coco", tmp_path / "coco")
    calls = []
    real = ds._sha256_file
    monkeypatch.setattr(ds, "_sha256_file", lambda p: calls.append(p) or real(p))
    first = write_manifest("coco", str(root), tmp_path, mode="content")
    assert len(calls) == first["num_files"]
    calls.clear()
    img = next((root / "val2017").iterdir())
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # touched: same bytes
    again = write_manifest("coco", str(root), tmp_path, mode="content")
    assert calls == [img] and again["fingerprint"] == first["fingerprint"]
    assert ds.state("coco", str(root), "content", outdir=tmp_path) == first["fingerprint"]  # Snakemake's trigger
    assert calls == [img]  # the trigger used the cache too
    other = shutil.copytree(root, tmp_path / "other")  # same paths, sizes and mtimes: a cache is per root
    calls.clear()
    assert write_manifest("coco", str(other), tmp_path, mode="content")["fingerprint"] == first["fingerprint"]
    assert len(calls) == first["num_files"]
    assert ds.state("coco", str(root)) == write_manifest("coco", str(root), tmp_path / "s")["fingerprint"]


@pytest.mark.parametrize(("name", "remove", "named"), [
    ("imagenet", "val", "val/"),
    ("coco", "annotations/instances_val2017.json", "annotations/instances_val2017.json"),
    ("ade20k", "ADEChallengeData2016/annotations/validation", "annotations/validation/"),
])  # fmt: skip
def test_missing_part_is_named(tree, tmp_path, name, remove, named):
    root = shutil.copytree(tree / name, tmp_path / name)
    p = root / remove
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    with pytest.raises(DatasetError, match=rf"datasets\.{name}: .*missing .*{named}.*expected") as e:
        write_manifest(name, str(root), tmp_path, what=f"datasets.{name}")
    assert str(root) in str(e.value)
    with pytest.raises(DatasetError, match="not a directory"):
        write_manifest(name, str(tmp_path / "nowhere"), tmp_path)


def test_image_suffixes_are_the_image_folders():
    from localmim.data.shards.manifest import IMAGE_FILE_SUFFIXES

    assert ds.IMAGE_SUFFIXES == IMAGE_FILE_SUFFIXES


# ------------------------------------------------------------------------------------------- ImageNet flat val


def _flatten_val(tree: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the ImageNet tree whose val images sit in one folder; returns it and {image id: class folder}."""
    root = shutil.copytree(tree / "imagenet", dst)
    truth = {}
    for img in sorted((root / "val").rglob("*.JPEG")):
        truth[img.stem] = img.parent.name
        img.rename(root / "val" / img.name)
    for d in [d for d in (root / "val").iterdir() if d.is_dir()]:
        d.rmdir()
    return root, truth


def _write_loc_csv(path: Path, truth: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for stem, wnid in truth.items():
            w.writerow([stem, f"{wnid} 1 2 30 40 {wnid} 5 6 20 22 "])


def _write_devkit(root: Path, truth: dict[str, str]) -> Path:
    """Devkit text file + meta.mat with ILSVRC2012_IDs in *reverse* class order and a non-leaf synset, so that a
    reader ordering by ID instead of mapping through meta.mat gets the wrong classes."""
    import numpy as np
    import scipy.io as sio

    wnids = sorted(set(truth.values()))
    ids = {w: len(wnids) - i for i, w in enumerate(wnids)}
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    n = max(int(s.rsplit("_", 1)[1]) for s in truth)
    gt = [ids[truth[f"ILSVRC2012_val_{i:08d}"]] if f"ILSVRC2012_val_{i:08d}" in truth else 1 for i in range(1, n + 1)]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{g}\n" for g in gt))
    rows = [(np.int32(ids[w]), w, w, np.int32(0)) for w in wnids] + [(np.int32(99), "n99999999", "all", np.int32(3))]
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    sio.savemat(data / "meta.mat", {"synsets": synsets})
    return root / "ILSVRC2012_devkit_t12"


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                samples[key][ext] = t.extractfile(m).read()
    return dict(samples)


def _same_shards(a: Path, b: Path) -> None:
    """Same samples under the same keys in the same shards; the json member differs only in the source path."""
    sa, sb = _samples(a), _samples(b)
    assert sa.keys() == sb.keys() and len(sa) == 9
    for key in sa:
        assert sa[key]["jpg"] == sb[key]["jpg"] and sa[key]["cls"] == sb[key]["cls"]
        ja, jb = json.loads(sa[key]["json"]), json.loads(sb[key]["json"])
        assert ja.pop("path").split("/")[-1] == jb.pop("path") and ja == jb
    ma, mb = (json.loads((d / "val.json").read_text()) for d in (a, b))
    for k in ("classes", "class_counts", "num_samples", "num_found"):
        assert ma[k] == mb[k]
    assert [s["num_samples"] for s in ma["shards"]] == [s["num_samples"] for s in mb["shards"]]


@pytest.fixture(scope="module")
def class_folder_shards(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards_classes")
    write_shards(tree / "imagenet" / "val", out, "val", ShardOptions(max_samples_per_shard=4, workers=1),
                 progress=False)  # fmt: skip
    return out


def _shard_inventory(inv, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    write_shards(inv, out, "val", ShardOptions(max_samples_per_shard=4, workers=1), progress=False)
    return out


def test_flat_val_with_loc_csv_gives_the_class_folder_shards(tree, tmp_path, class_folder_shards):
    root, truth = _flatten_val(tree, tmp_path / "imagenet")
    with pytest.raises(DatasetError, match=r"LOC_val_solution\.csv.*ILSVRC2012_devkit_t12"):
        scan_imagenet_split(root / "val", "val")  # no ground truth anywhere: every place looked at is named
    _write_loc_csv(root / "LOC_val_solution.csv", truth)
    _same_shards(class_folder_shards, _shard_inventory(scan_imagenet_split(root / "val", "val"), tmp_path))

    # through the DAG's path: the manifest lists the ground truth, the shard stage reads the layout from it
    from localmim.stages.shard import source_inventory

    man = write_manifest("imagenet", str(root), tmp_path / "raw")
    assert man["splits"]["val"]["layout"] == "flat" and man["splits"]["val"]["labels"] == ["LOC_val_solution.csv"]
    inv = source_inventory(str(tmp_path / "raw" / "imagenet.json"), "val")
    assert inv.files == scan_imagenet_split(root / "val", "val").files
    extra = root / "val" / "ILSVRC2012_val_00009999.JPEG"
    shutil.copy(next((root / "val").iterdir()), extra)
    with pytest.raises(LabelsError, match="ILSVRC2012_val_00009999.JPEG: no ground-truth label"):
        scan_flat_val(root / "val")
    extra.unlink()
    gone = sorted((root / "val").glob("*.JPEG"))[0]
    gone.unlink()  # after the manifest was written: the stage refuses to shard a tree the DAG does not describe
    with pytest.raises(ValueError, match=rf"changed after its manifest .*1 removed, e\.g\. {gone.name}"):
        source_inventory(str(tmp_path / "raw" / "imagenet.json"), "val")


def test_flat_val_with_devkit_gives_the_class_folder_shards(tree, tmp_path, class_folder_shards):
    root, truth = _flatten_val(tree, tmp_path / "imagenet")
    devkit = _write_devkit(root, truth)
    labels = read_val_labels(ds.find_val_labels(root / "val"))
    assert labels == truth
    _same_shards(class_folder_shards, _shard_inventory(scan_imagenet_split(root / "val", "val"), tmp_path))

    # torchvision's tarball of the devkit, instead of the folder
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        t.add(devkit, arcname="ILSVRC2012_devkit_t12")
    shutil.rmtree(devkit)
    assert ds.find_val_labels(root / "val") == [root / "ILSVRC2012_devkit_t12.tar.gz"]
    assert read_val_labels(ds.find_val_labels(root / "val")) == truth


def test_dataset_stage_embedded_copy_survives_a_checkout(tree, tmp_path):
    """``localmim dataset NAME OUT`` with an empty param describes OUT/NAME by content: a DVC checkout rewrites the
    files (same bytes, new mtimes) and the manifest stays byte-identical. With a path, the param's folder is used."""
    from tests.conftest import ROOT, run_cli

    shutil.copytree(tree / "coco", tmp_path / "raw" / "coco")
    args = ("dataset", "coco", "raw", "--params", str(ROOT / "params.yaml"))
    run_cli(*args, cwd=tmp_path, check=True, LOCALMIM_TRACKING="0")
    first = (tmp_path / "raw" / "coco.json").read_bytes()
    assert json.loads(first)["source"] == "embedded" and json.loads(first)["root"] == "raw/coco"
    for p in (tmp_path / "raw" / "coco").rglob("*.jpg"):
        data = p.read_bytes()
        p.unlink()
        p.write_bytes(data)
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    run_cli(*args, cwd=tmp_path, check=True, LOCALMIM_TRACKING="0")
    assert (tmp_path / "raw" / "coco.json").read_bytes() == first
    p = run_cli(*args, "--set", f"datasets.coco={tree / 'ade20k'}", cwd=tmp_path, LOCALMIM_TRACKING="0")
    assert p.returncode == 1 and f"datasets.coco: {tree / 'ade20k'}: missing train2017/, " in p.stderr

"""Damaged image files in ADE20K and COCO (issue 21): the full-decode check and its cache, the one reader, the
load-time rule (skip with a record / fail with one line), counts that reconcile, and both stages end to end.

Decided per case: a truncated JPEG and a zero-byte file are bad (skipped, named); a PNG renamed ``.jpg`` decodes
by content (PIL, and every reader here, look at the bytes, not the name), so it is *used* and named in ``notes``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from localmim.data.dense import ade20k as A
from localmim.data.dense import ade20k_transforms as AT
from localmim.data.dense.coco import coco_dataset, collate, load_coco
from localmim.data.dense.coco_transforms import eval_transforms
from localmim.data.dense.samplers import StepBatches
from localmim.data.raw import imagefile as F
from localmim.eval.detection import ScoredGroundTruth
from localmim.synth import write_ade20k
from tests.coco_data import synth_coco
from tests.conftest import cli_env, run_cli
from tests.encoders import micro_encoder

# ------------------------------------------------------------------------------------------------ damage


def _truncate(path: Path) -> None:
    """Cut a JPEG inside its entropy-coded data (headers intact), as an interrupted copy does."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    path.write_bytes(data[: (sos + len(data)) // 2])


def _png_as_jpg(path: Path) -> None:
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _damage_keeping_stat(path: Path) -> None:
    """Same size, same mtime, no longer an image: damage the (size, mtime) cache cannot see."""
    st = path.stat()
    path.write_bytes(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


PLANTED = {"truncated": _truncate, "zero": lambda p: p.write_bytes(b""), "png": _png_as_jpg}
REASONS = {"truncated": "truncated JPEG", "zero": "zero-byte file"}


def _plant(files: list[Path]) -> dict[str, Path]:
    """Damage the first three of ``files`` (truncated, zero-byte, PNG renamed .jpg)."""
    for fn, f in zip(PLANTED.values(), files, strict=False):
        fn(f)
    return dict(zip(PLANTED, files, strict=False))


# ------------------------------------------------------------------------------------- check, cache, reader


def test_check_and_reader_agree_on_each_case(tmp_path):
    write_ade20k(tmp_path, seed=0, num_classes=3, sizes={"train": 4}, min_side=32, max_side=40, quality=90)
    files = sorted((tmp_path / "ADEChallengeData2016" / "images" / "training").glob("*.jpg"))
    planted = _plant(files)
    for how, reason in REASONS.items():
        check = F.check_image_file(planted[how])
        assert check.reason.startswith(reason), check
        with pytest.raises(F.ImageFileError) as e:
            F.read_image(planted[how])
        assert str(e.value) == f"{planted[how]}: {check.reason}" and e.value.path == str(planted[how])
    png = F.check_image_file(planted["png"])
    assert png.reason is None and png.note.startswith("PNG content under a .jpg name")
    with Image.open(files[3]) as im:
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(F.read_image(files[3])), want)
    assert (F.check_image_file(files[3]).width, F.check_image_file(files[3]).height) == want.shape[1::-1]


def test_cache_decodes_only_new_or_changed_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(70):  # >= 64: the worker-process path
        p = tmp_path / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(p, quality=80)
        paths.append(p)
    _truncate(paths[5])
    cache = tmp_path / "ck" / "image-check.json"
    first = F.check_image_files([(p, "image") for p in paths], cache=cache, workers=2)
    assert [p for p in paths if first[str(p)].reason] == [paths[5]] and first[str(paths[0])].width == 16
    calls = []
    real = F.check_image_file
    monkeypatch.setattr(F, "check_image_file", lambda p, kind="image": calls.append(p) or real(p, kind))
    again = F.check_image_files([(p, "image") for p in paths], cache=cache)
    assert calls == [] and again == first
    paths[7].write_bytes(b"")  # changed: size and mtime
    third = F.check_image_files([(p, "image") for p in paths], cache=cache)
    assert calls == [str(paths[7])] and third[str(paths[7])].reason == "zero-byte file"


# ---------------------------------------------------------------------------------------------- ADE20K


def _ade(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Path]]]:
    write_ade20k(tmp_path / "ade", seed=0, num_classes=4, sizes={"train": 7, "val": 5}, min_side=32, max_side=48,
                 quality=90)
    base = tmp_path / "ade" / "ADEChallengeData2016" / "images"
    return tmp_path / "ade", {s: _plant(sorted((base / d).glob("*.jpg"))) for s, d in A.SPLIT_DIRS.items()}


def test_ade20k_scan_names_each_bad_file_and_counts_reconcile(tmp_path):
    root, planted = _ade(tmp_path)
    for split, files in planted.items():
        scan = A.scan_split(root, split, num_classes=4, cache=tmp_path / "ck" / "image-check.json")
        reasons = {s["file"]: s["reason"] for s in scan.skipped}
        assert set(reasons) == {str(files["truncated"]), str(files["zero"])}
        assert "truncated JPEG" in reasons[str(files["truncated"])] and "zero-byte" in reasons[str(files["zero"])]
        assert [n["file"] for n in scan.notes] == [str(files["png"])] and files["png"] in [p.image for p in scan.pairs]
        assert scan.found == len(scan.pairs) + len(scan.skipped) == (7 if split == "train" else 5)
        with pytest.raises(ValueError, match=f"{files['truncated'].name}: unreadable image: truncated JPEG"):
            A.scan_split(root, split, num_classes=4, on_bad="fail")


def test_ade20k_file_damaged_after_the_scan_is_replaced_recorded_or_fails(tmp_path):
    root, _ = _ade(tmp_path)
    pairs = A.scan_split(root, "train", num_classes=4).pairs  # 5 usable pairs
    tf = AT.train_transform(32, (64, 32), (0.5, 2.0), 0.75)
    clean = A.TrainSet(pairs, tf)
    want = clean[(2, 11)]  # what pair 2 gives with seed 11
    _damage_keeping_stat(pairs[1].image)
    log = str(tmp_path / "skips.jsonl")
    pairs.skips = F.LoadSkips(log, "skip", "train")
    got = A.TrainSet(pairs, tf)[(1, 11)]  # pair 1 is gone: pair 2 takes its place with the same seed
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert [(r["file"], r["split"]) for r in pairs.skips.records()] == [(str(pairs[1].image), "train")]
    assert "not an image" in pairs.skips.records()[0]["reason"]
    # every rank keeps its steps and batch size (2 ranks, batch 2, 4 steps)
    for rank in (0, 1):
        batches = list(torch.utils.data.DataLoader(A.TrainSet(pairs, tf),
                                                   batch_sampler=StepBatches(len(pairs), 2, 4, 0, rank, 2)))
        assert [b[0].shape[0] for b in batches] == [2, 2, 2, 2]
    # evaluation: a placeholder that adds nothing (index -1, every label ignored)
    img, mask, idx = A.ValSet(pairs, (64, 32))[1]
    assert idx == -1 and bool((mask == A.IGNORE).all())
    # fail: one line naming the file, also through a DataLoader worker
    pairs.skips = F.LoadSkips(log, "fail", "train")
    loader = torch.utils.data.DataLoader(A.TrainSet(pairs, tf), batch_sampler=[[(1, 0)]], num_workers=1)
    with pytest.raises(F.ImageFileError) as e:
        next(iter(loader))
    assert F.one_line(e.value) == f"{pairs[1].image}: not an image: cannot identify image file"


# ------------------------------------------------------------------------------------------------ COCO


def _coco(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Path]]]:
    root = synth_coco(tmp_path / "coco", train=7, val=5)
    return root, {s: _plant(sorted((root / f"{s}2017").glob("*.jpg"))) for s in ("train", "val")}


def test_coco_check_names_each_bad_file_and_counts_reconcile(tmp_path):
    root, planted = _coco(tmp_path)
    for split, files in planted.items():
        sp = load_coco(root, split, train=split == "train", cache=tmp_path / "ck" / "image-check.json")
        rep = sp.report
        bad = {s["id"]: s["reason"] for s in rep.skipped if s["kind"] == "image"}
        ids = {str(root / f"{split}2017" / img["file_name"]): img["id"]
               for img in json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())["images"]}
        assert bad == {ids[str(files["truncated"])]: bad[ids[str(files["truncated"])]],
                       ids[str(files["zero"])]: f"{files['zero']}: zero-byte file"}
        assert f"{files['truncated']}: truncated JPEG" in bad[ids[str(files["truncated"])]]
        assert [n["id"] for n in rep.notes] == [ids[str(files["png"])]] and ids[str(files["png"])] in sp.coco.imgs
        assert rep.reconciles() and rep.images_used == rep.images_found - 2


def test_coco_file_damaged_after_the_check_is_replaced_or_left_out_of_the_scoring(tmp_path):
    root = synth_coco(tmp_path / "coco", train=3, val=3)
    val = load_coco(root, "val")
    gone = sorted(val.coco.imgs)[1]
    path = val.image_dir / val.coco.imgs[gone]["file_name"]
    _damage_keeping_stat(path)
    skips = F.LoadSkips(str(tmp_path / "skips.jsonl"), "skip", "val")
    ds = coco_dataset(val, eval_transforms(val), skips)
    images, targets = collate([ds[i] for i in range(len(ds))])
    assert [t["image_id"] for t in targets] == [i for i in sorted(val.coco.imgs) if i != gone]
    scored = ScoredGroundTruth(val, skips).dataset
    assert sorted(i["id"] for i in scored["images"]) == [t["image_id"] for t in targets]
    assert all(a["image_id"] != gone for a in scored["annotations"]) and scored["categories"]
    n_anns = len(val.coco.imgToAnns[gone])
    before = (val.report.images_used, val.report.annotations_used)
    val.report.add_load_skips(val.coco, val.image_dir, skips.records())
    assert (val.report.images_used, val.report.annotations_used) == (before[0] - 1, before[1] - n_anns)
    assert val.report.reconciles() and str(path) in val.report.skipped[-1 - n_anns]["reason"]
    train_ds = coco_dataset(val, eval_transforms(val), F.LoadSkips(str(tmp_path / "t.jsonl"), "skip", "train"),
                            train=True)
    assert train_ds[1][1]["image_id"] == sorted(val.coco.imgs)[2]  # substituted: the batch keeps its size


# ---------------------------------------------------------------------------------------- both stages


def _stage_data(tmp_path: Path, root: Path, files: dict[str, list[Path]], scan) -> dict[str, Path]:
    """Plant the three cases in each split, fill the check cache, then damage one more file per split behind
    the cache's back (same size and mtime): the scan passes it and loading fails."""
    planted = {s: _plant(fs) for s, fs in files.items()}
    scan(tmp_path / "ck" / "image-check.json")
    late = {s: fs[3] for s, fs in files.items()}
    for f in late.values():
        _damage_keeping_stat(f)
    return {"planted": planted, "late": late}


def test_segment_stage_finishes_names_each_file_and_reconciles(tmp_path):
    write_ade20k(tmp_path / "ade", seed=0, num_classes=4, sizes={"train": 8, "val": 6}, min_side=32, max_side=48,
                 quality=90)
    base = tmp_path / "ade" / "ADEChallengeData2016"
    files = {s: sorted((base / "images" / d).glob("*.jpg")) for s, d in A.SPLIT_DIRS.items()}
    got = _stage_data(tmp_path, tmp_path / "ade", files, lambda cache: [
        A.scan_split(tmp_path / "ade", s, 4, cache=cache) for s in ("train", "val")])
    micro_encoder(tmp_path / "enc")
    seg = dict(num_classes=4, crop_size=32, scale=[64, 32], test_scale=[64, 32], channels=16, aux_channels=8,
               iters=3, global_batch=2, batch_size=2, warmup_iters=1, eval_every=0, ckpt_every=3, log_every=1,
               num_workers=1, slide_stride=24, num_vis=6)
    (tmp_path / "params.yaml").write_text(json.dumps({"segment": seg}))
    p = run_cli("segment", "--encoder", "enc", "--data", "ade", "--out", "seg", "--metrics", "m.json", "--ckpt-dir",
                "ck", "--no-progress", cwd=tmp_path, LOCALMIM_TRACKING="0")
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    for s, n in (("train", 8), ("val", 6)):
        named = {str(tmp_path / x["file"]): x["reason"] for x in m["skipped"][s]}  # as given: relative to cwd
        pl, late = got["planted"][s], got["late"][s]
        assert set(named) == {str(pl["truncated"]), str(pl["zero"]), str(late)}
        assert named[str(late)].startswith("failed to load: not an image")
        assert [str(tmp_path / x["file"]) for x in m["notes"][s]] == [str(pl["png"])]
        assert (m[f"{s}_found"], m[f"{s}_used"], m[f"{s}_skipped"]) == (n, n - 3, 3)
    assert m["val_images"] == 3
    # the reported mIoU is the one of the written label maps alone (the late val file added nothing)
    preds, gts = [], []
    for pred_p in sorted((tmp_path / "seg" / "pred").glob("*.png")):
        gt = np.asarray(Image.open(base / "annotations" / "validation" / pred_p.name)).astype(int)
        preds.append(np.asarray(Image.open(pred_p)).astype(int) - 1)
        gts.append(np.where(gt == 0, 255, gt - 1))
    late_ann = got["late"]["val"].with_suffix(".png").name
    assert len(preds) == 3 and late_ann not in {q.name for q in (tmp_path / "seg" / "pred").iterdir()}
    p, g = np.concatenate([x.ravel() for x in preds]), np.concatenate([x.ravel() for x in gts])
    keep = g != 255
    ious = [np.sum((p[keep] == c) & (g[keep] == c)) / u for c in range(4)
            if (u := np.sum((p[keep] == c) | (g[keep] == c)))]
    assert m["mIoU"] == pytest.approx(100 * np.mean(ious), rel=1e-9)


def test_detect_stage_finishes_names_each_file_and_reconciles(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = synth_coco(tmp_path / "coco", train=8, val=6)
    files = {s: sorted((root / f"{s}2017").glob("*.jpg")) for s in ("train", "val")}
    got = _stage_data(tmp_path, root, files, lambda cache: [
        load_coco(root, s, train=s == "train", cache=cache) for s in ("train", "val")])
    enc = micro_encoder(tmp_path / "enc")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["detect"]
    params |= {"epochs": 1, "num_workers": 1, "image_size": 32, "global_batch": 2, "batch_size": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"detect": params}))
    p = run_cli("detect", "--encoder", str(enc), "--data", str(root), "--out", "out", "--ckpt-dir", "ck",
                "--metrics", "m.json", "--params", "params.yaml", cwd=tmp_path, LOCALMIM_TRACKING="0")
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert (m["train_images"], m["val_images"]) == (5, 3)
    for s in ("train", "val"):
        rep = report[s]
        doc = json.loads((root / "annotations" / f"instances_{s}2017.json").read_text())
        by_file = {str(root / f"{s}2017" / i["file_name"]): i["id"] for i in doc["images"]}
        pl, late = got["planted"][s], got["late"][s]
        skipped = {x["id"]: x["reason"] for x in rep["skipped"] if x["kind"] == "image"}
        assert set(skipped) == {by_file[str(f)] for f in (pl["truncated"], pl["zero"], late)}
        assert skipped[by_file[str(late)]] == f"{late}: failed to load: not an image: cannot identify image file"
        assert [n["id"] for n in rep["notes"]] == [by_file[str(pl["png"])]]
        n_ann_skipped = sum(x["kind"] == "annotation" for x in rep["skipped"])
        assert rep["images_found"] == rep["images_used"] + len(skipped)
        assert rep["annotations_found"] == rep["annotations_used"] + n_ann_skipped
    # the reported AP is pycocotools' on the written detections against the used val images only
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    used = {i["id"] for i in doc["images"]} - {x["id"] for x in report["val"]["skipped"] if x["kind"] == "image"}
    doc = {**doc, "images": [i for i in doc["images"] if i["id"] in used],
           "annotations": [a for a in doc["annotations"] if a["image_id"] in used]}
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    results = json.loads((tmp_path / "out" / "detections_val.json").read_text())
    assert results and {r["image_id"] for r in results} <= used
    gt = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert m["bbox_AP"] == ev.stats[0]


@pytest.mark.slow
def test_segment_under_torchrun_two_ranks_keeps_every_step(tmp_path):
    """2 CPU ranks (gloo, DDP): the rank that meets the file damaged after the check substitutes it and takes
    the same step as the other (a missing step would hang the all-reduce); both ranks' records reach the report."""
    write_ade20k(tmp_path / "ade", seed=2, num_classes=4, sizes={"train": 6, "val": 5}, min_side=32, max_side=48,
                 quality=90)
    base = tmp_path / "ade" / "ADEChallengeData2016"
    files = {s: sorted((base / "images" / d).glob("*.jpg")) for s, d in A.SPLIT_DIRS.items()}
    got = _stage_data(tmp_path, tmp_path / "ade", files, lambda cache: [
        A.scan_split(tmp_path / "ade", s, 4, cache=cache) for s in ("train", "val")])
    micro_encoder(tmp_path / "enc")
    seg = dict(num_classes=4, crop_size=32, scale=[64, 32], test_scale=[64, 32], channels=16, aux_channels=8,
               iters=1, global_batch=4, batch_size=2, warmup_iters=1, eval_every=0, ckpt_every=1, log_every=1,
               num_workers=0, slide_stride=24, num_vis=2)  # 4 usable train pairs = 1 step of 2 x 2: every pair loaded
    (tmp_path / "params.yaml").write_text(json.dumps({"segment": seg}))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "localmim.cli",
           "segment", "--encoder", "enc", "--data", "ade", "--out", "seg", "--metrics", "m.json", "--ckpt-dir", "ck",
           "--no-progress", "--params", "params.yaml"]
    p = subprocess.run(cmd, cwd=tmp_path, env=cli_env(LOCALMIM_TRACKING="0"), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["world_size"] == 2 and m["iters"] == 1
    for s, n in (("train", 6), ("val", 5)):
        named = {str(tmp_path / x["file"]) for x in m["skipped"][s]}
        assert str(got["late"][s]) in named and len(named) == 3
        assert (m[f"{s}_found"], m[f"{s}_used"], m[f"{s}_skipped"]) == (n, n - 3, 3)
    assert m["val_images"] == 2

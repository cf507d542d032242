"""The segment stage (method §9.1): metrics vs NumPy, neck shapes, inference modes, augmentation alignment,
reduce-zero-label, bad inputs, resume after SIGKILL, no resume across params or encoders, and the stage through the
CLI on the synth layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, run_cli
from PIL import Image
from torchvision import tv_tensors

from localmim.data.dense import ade20k as A
from localmim.data.dense import ade20k_transforms as AT
from localmim.eval.segmentation import confusion_matrix, scores, slide_logits
from localmim.models import create
from localmim.models.encoder_io import EncoderSpec
from localmim.models.segmentation import SegmenterSpec, build_segmenter
from localmim.train.schedule import PolyWarmup
from tests.encoders import micro_encoder, micro_spec
from tests.resume import kill_then_resume, same_weights

# ------------------------------------------------------------------------------------------------- metrics


def _numpy_scores(preds: list[np.ndarray], gts: list[np.ndarray], k: int) -> dict:
    """mIoU / mAcc / aAcc written from the definition, pixel lists in float64."""
    p = np.concatenate([x.ravel() for x in preds]).astype(np.int64)
    g = np.concatenate([x.ravel() for x in gts]).astype(np.int64)
    keep = g != 255
    p, g = p[keep], g[keep]
    ious, accs = [], []
    for c in range(k):
        inter = np.sum((p == c) & (g == c))
        union = np.sum((p == c) | (g == c))
        if union:
            ious.append(inter / union)
        if np.sum(g == c):
            accs.append(inter / np.sum(g == c))
    return {"mIoU": 100 * np.mean(ious), "mAcc": 100 * np.mean(accs), "aAcc": 100 * np.mean(p == g)}


def test_metrics_match_numpy_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    k = 7
    preds, gts = [], []
    for _ in range(3):
        g = rng.choice([0, 1, 2, 4, 255], size=(13, 17)).astype(np.uint8)  # 3, 5, 6 absent from the ground truth
        p = rng.choice([0, 1, 2, 3, 4], size=(13, 17))  # 3: predicted only; 5, 6: absent from both
        preds.append(p), gts.append(g)
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), k) for p, g in zip(preds, gts, strict=True))
    got, want = scores(cm), _numpy_scores(preds, gts, k)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    assert np.isnan(got["per_class_iou"][5]) and np.isnan(got["per_class_iou"][6])
    assert got["per_class_iou"][3] == 0.0 and np.isnan(got["per_class_acc"][3])
    assert int(cm.sum()) == sum(int((g != 255).sum()) for g in gts)


# ----------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name,shapes", [
    ("localmim_vit_base_patch16", [(2, 768, 128, 128), (2, 768, 64, 64), (2, 768, 32, 32), (2, 768, 16, 16)]),
    ("localmim_swin_base", [(2, 128, 128, 128), (2, 256, 64, 64), (2, 512, 32, 32), (2, 1024, 16, 16)]),
])
def test_neck_shapes_at_512(name, shapes):
    from localmim.models.export import export_encoder
    from localmim.models.swin import export_swin_encoder

    export = export_swin_encoder if "swin" in name else export_encoder
    with torch.device("meta"):
        timm_name, kwargs, _ = export(create(name))
        model = build_segmenter(EncoderSpec(timm_name, kwargs, {}),
                                SegmenterSpec(num_classes=150, crop_size=512, channels=64), pretrained=False)
        x = torch.empty(2, 3, 512, 512)
        assert [tuple(f.shape) for f in model.levels(x)] == shapes
        logits, aux = model.train()(x)
    assert tuple(logits.shape) == tuple(aux.shape) == (2, 150, 512, 512)


def test_slide_equals_whole_when_one_window_covers_the_image():
    torch.manual_seed(0)
    model = build_segmenter(micro_spec(), SegmenterSpec(num_classes=5, crop_size=32, channels=16,
                                                        aux_channels=8)).eval()
    img = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        whole = model(img)[0]
    torch.testing.assert_close(slide_logits(model, img, 5, crop=64, stride=40), whole, rtol=0, atol=0)

    # a per-pixel model: any window grid must give the whole-image logits (the overlap averaging is exact)
    conv = torch.nn.Conv2d(3, 5, 1)
    per_pixel = lambda x: (conv(x.float()), None)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(per_pixel, img, 5, crop=24, stride=16), conv(img.float()))


def test_poly_warmup_schedule():
    s = PolyWarmup(lr=4e-4, iters=100, power=1.0, min_lr=0.0, warmup_iters=10, warmup_ratio=1e-6)
    for i in range(0, 101, 3):
        poly = 4e-4 * (1 - i / 100)
        want = poly * (1 - (1 - i / 10) * (1 - 1e-6)) if i < 10 else poly
        assert s(i) == pytest.approx(want, rel=1e-12, abs=1e-20)
    assert s(0) == pytest.approx(4e-10) and s(100) == 0.0


# -------------------------------------------------------------------------------------------------- the data

COLOURS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [240, 240, 20]], np.uint8)


def test_augmentation_keeps_image_and_mask_aligned():
    """The image is COLOURS[label]; after rescale/crop/flip/pad the colour must still give the label."""
    ys, xs = np.mgrid[0:60, 0:90]
    lab = ((ys // 15) * 3 + xs // 30) % 4  # [60, 90] blocks of 15 x 30
    lab[:, :8] = 255  # an ignored stripe
    img = COLOURS[np.where(lab == 255, 0, lab)]
    tf = AT.train_transform(48, scale=(120, 60), ratio_range=(0.7, 1.6), cat_max_ratio=0.75, photometric=False)
    for seed in range(12):
        torch.manual_seed(seed)
        im, m = tf(tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(lab)))
        im, m = im.permute(1, 2, 0).numpy().astype(int), m.numpy()
        assert im.shape[:2] == m.shape == (48, 48)
        interior = np.ones_like(m, bool)  # pixels whose 3x3 neighbourhood has one label (bilinear blends edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior &= np.roll(m, (dy, dx), (0, 1)) == m
        sel = interior & (m != 255)
        nearest = np.argmin(((im[sel][:, None, :] - COLOURS[None].astype(int)) ** 2).sum(-1), 1)
        assert np.mean(nearest == m[sel]) > 0.99
    assert set(np.unique(m)) <= {0, 1, 2, 3, 255}


def test_crop_obeys_the_category_max_ratio_when_possible():
    torch.manual_seed(0)
    mask = torch.zeros(1, 100, 100, dtype=torch.uint8)
    mask[:, 75:, 75:] = 1  # class 1 only in one corner: most random 20x20 crops are > 75% class 0 (or class 1)
    mask[:, :50, :50] = 255  # ignored pixels do not count
    crop = AT.CatMaxRatioCrop(20, 0.75, tries=1000)
    for _ in range(10):
        p = crop.make_params([tv_tensors.Mask(mask)])
        c = mask[0, p["top"]:p["top"] + 20, p["left"]:p["left"] + 20]
        counts = np.bincount(c[c != 255].numpy(), minlength=2)
        assert counts.min() > 0 and counts.max() / counts.sum() < 0.75
    plain = AT.CatMaxRatioCrop(20, 1.0)
    shares = []
    for _ in range(50):
        p = plain.make_params([tv_tensors.Mask(mask)])
        c = mask[0, p["top"]:p["top"] + 20, p["left"]:p["left"] + 20]
        counts = np.bincount(c[c != 255].numpy(), minlength=2)
        shares.append(counts.max() / max(counts.sum(), 1))
    assert np.mean(np.array(shares) >= 0.75) > 0.5  # the rule is what makes the difference


def test_reduce_zero_label():
    raw = np.array([[0, 1, 2], [150, 254, 255]], np.uint8)
    want = np.array([[255, 0, 1], [149, 253, 255]], np.uint8)
    np.testing.assert_array_equal(A.reduce_zero_label(raw), want)


def _layout(root: Path, n_train: int = 3, n_val: int = 2, classes: int = 4, size=(24, 32)) -> Path:
    """A tiny ADE20K release: random images, labels 0..classes."""
    rng = np.random.default_rng(0)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"ADE_{split[:5]}_{i:08d}"
            rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(base / "images" / split / f"{stem}.jpg")
            ann = rng.integers(0, classes + 1, size, dtype=np.uint8)
            Image.fromarray(ann, "L").save(base / "annotations" / split / f"{stem}.png")
    return base


@pytest.mark.parametrize("bad,reason", [
    ("no_annotation", "image without annotation"),
    ("no_image", "annotation without image"),
    ("size", "image 32x24 vs annotation 31x24"),
    ("label", "label values [7] above num_classes=4"),
    ("unreadable", "unreadable image"),
    ("not_image", "not an image file"),
])
def test_each_bad_input_is_skipped_with_its_reason_or_fails(tmp_path, bad, reason):
    base = _layout(tmp_path)
    img_dir, ann_dir = base / "images" / "training", base / "annotations" / "training"
    stem = "ADE_train_00000001"
    if bad == "no_annotation":
        (ann_dir / f"{stem}.png").unlink()
    elif bad == "no_image":
        (img_dir / f"{stem}.jpg").unlink()
    elif bad == "size":
        Image.fromarray(np.ones((24, 31), np.uint8), "L").save(ann_dir / f"{stem}.png")
    elif bad == "label":
        Image.fromarray(np.full((24, 32), 7, np.uint8), "L").save(ann_dir / f"{stem}.png")
    elif bad == "unreadable":
        (img_dir / f"{stem}.jpg").write_bytes(b"not a jpeg at all")
    else:
        (img_dir / "notes.txt").write_text("hello")
    scan = A.scan_split(tmp_path, "train", num_classes=4, on_bad="skip")
    assert len(scan.skipped) == 1 and reason in scan.skipped[0]["reason"]
    assert scan.found == len(scan.pairs) + len(scan.skipped)
    assert len(scan.pairs) == (3 if bad == "not_image" else 2)
    with pytest.raises(ValueError, match=reason.split(" [")[0]):
        A.scan_split(tmp_path, "train", num_classes=4, on_bad="fail")


def test_empty_split_and_missing_layout_fail(tmp_path):
    base = _layout(tmp_path, n_val=0)
    with pytest.raises(ValueError, match="empty ADE20K val split"):
        A.scan_split(tmp_path, "val", num_classes=4)
    with pytest.raises(ValueError, match="not an ADE20K release"):
        A.scan_split(base / "images", "train", num_classes=4)


# ---------------------------------------------------------------------------------- resume / the CLI stage

TINY = dict(num_classes=4, crop_size=32, scale=[64, 32], test_scale=[64, 32], channels=16, aux_channels=8, iters=6,
            global_batch=2, batch_size=2, warmup_iters=2, eval_every=3, ckpt_every=2, log_every=1, num_workers=1,
            slide_stride=24, num_vis=2)

SCRIPT = """
import os, signal, sys, torch
from localmim.config.segment import SegmentConfig
from localmim.data.dense.ade20k import scan_split
from localmim.models.encoder_io import read_encoder
from localmim.train.segment import run_segment
cfg = SegmentConfig(**{cfg})
def log_fn(metrics, step):
    if os.environ.get("KILL") and step == 3:  # a checkpoint exists after step 2
        os.kill(os.getpid(), signal.SIGKILL)
tr, va = (scan_split(sys.argv[1], s, cfg.num_classes).pairs for s in ("train", "val"))
r = run_segment(cfg, read_encoder(sys.argv[2]), tr, va, sys.argv[3], log_fn=log_fn, progress=False)
torch.save({{"state": r.model.state_dict(), "mIoU": r.metrics["mIoU"]}}, sys.argv[4])
"""


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    """Global batch 4 in 2 micro-batches of 2: killed after step 3, resumed at step 2, bit-identical at the end."""
    _layout(tmp_path / "ade", n_train=6, n_val=2)
    enc = micro_encoder(tmp_path / "enc")
    resumed, _ = kill_then_resume(tmp_path, SCRIPT.format(cfg=repr({**TINY, "global_batch": 4})), lambda t: [
        str(tmp_path / "ade"), str(enc), str(tmp_path / f"ck_{t}"), str(tmp_path / f"{t}.pt")], {"KILL": "1"})
    assert "(epoch 0, step 2)" in resumed
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert same_weights(a["state"], b["state"])
    assert a["mIoU"] == b["mIoU"]
    init = torch.load(enc / "encoder.pt")
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], a["state"]["backbone.encoder.blocks.0.attn.qkv.weight"])


def test_other_params_or_another_encoder_never_resume(tmp_path, capsys):
    """A run resumes only its own checkpoints (as pretrain and finetune): the same params and encoder resume the
    finished run (nothing left to train, same weights); other params, or another encoder, start afresh in their own
    run directory (the weights of a fresh run in an empty directory), leaving the first run's checkpoint intact."""
    from localmim.config.segment import SegmentConfig
    from localmim.runtime import checkpoint as ckpt
    from localmim.train.segment import run_segment

    _layout(tmp_path / "ade", n_train=4, n_val=1)
    tr, va = (A.scan_split(tmp_path / "ade", s, 4).pairs for s in ("train", "val"))
    cfg = SegmentConfig(**{**TINY, "iters": 2, "eval_every": 0, "ckpt_every": 2, "num_workers": 0})

    def run(c, enc, ck: str = "ck"):
        capsys.readouterr()
        r = run_segment(c, enc, tr, va, tmp_path / ck, progress=False)
        return r.model.state_dict(), r.checkpoint, "resumed from" in capsys.readouterr().out

    first, first_ckpt, resumed = run(cfg, micro_spec())
    assert not resumed
    again, _, resumed = run(cfg, micro_spec())
    assert resumed and same_weights(again, first)
    for c, enc in ((cfg.model_copy(update={"lr": 2e-4}), micro_spec()), (cfg, micro_spec(seed=1))):
        got, path, resumed = run(c, enc)
        assert not resumed and path.parent != first_ckpt.parent
        assert same_weights(got, run(c, enc, ck=f"fresh_{path.parent.name}")[0])
    assert len(list((tmp_path / "ck").iterdir())) == 3 and ckpt.find_latest(first_ckpt.parent) == first_ckpt


def test_stage_through_the_cli_on_the_synth_layout(tmp_path):
    from localmim.synth import write_ade20k

    write_ade20k(tmp_path / "ade", seed=0, num_classes=4, sizes={"train": 6, "val": 3}, min_side=32, max_side=48,
                 quality=90)
    base = tmp_path / "ade" / "ADEChallengeData2016"
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(base / "annotations" / "training" / "orphan.png")
    micro_encoder(tmp_path / "enc")
    (tmp_path / "params.yaml").write_text(json.dumps({"segment": {**TINY, "eval_every": 0, "ckpt_every": 6}}))
    p = run_cli("segment", "--encoder", "enc", "--data", "ade", "--out", "seg", "--metrics", "m/segment.json",
                "--ckpt-dir", "ck", "--no-progress", cwd=tmp_path, LOCALMIM_TRACKING="0")
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "m" / "segment.json").read_text())
    assert (m["train_found"], m["train_used"], m["train_skipped"]) == (7, 6, 1)
    assert m["skipped"]["train"][0]["reason"] == "annotation without image"
    assert m["val_images"] == 3 and m["iters"] == 6 and m["inference"] == "slide"
    # re-score the written label maps (ADE20K convention) against the annotations, independently
    preds, gts = [], []
    for ann in sorted((base / "annotations" / "validation").glob("*.png")):
        pred = np.asarray(Image.open(tmp_path / "seg" / "pred" / ann.name))
        gt = np.asarray(Image.open(ann))
        assert pred.shape == gt.shape and pred.min() >= 1 and pred.max() <= 4
        preds.append(pred.astype(int) - 1)
        gts.append(np.where(gt == 0, 255, gt.astype(int) - 1))
    assert m["mIoU"] == pytest.approx(_numpy_scores(preds, gts, 4)["mIoU"], rel=1e-9)
    counts = np.bincount(np.concatenate([g[g != 255] for g in gts]), minlength=4)  # the baseline of the report
    majority = [np.full_like(g, counts.argmax()) for g in gts]
    assert m["mIoU_majority"] == pytest.approx(_numpy_scores(majority, gts, 4)["mIoU"], rel=1e-9)
    assert {"model.pt", "model.json", "grid.png", "per_class.csv", "params.yaml"} <= {
        f.name for f in (tmp_path / "seg").iterdir()}
    state = torch.load(tmp_path / "seg" / "model.pt", weights_only=True)
    assert "decode_head.cls.weight" in state and not list(tmp_path.glob(".seg*"))
    from localmim.models.artifact import load_model

    model, spec = load_model(tmp_path / "seg", task="segment")  # the saved segmenter rebuilds and takes its weights
    assert spec.num_classes == 4 and torch.equal(model.state_dict()["decode_head.cls.weight"],
                                                  state["decode_head.cls.weight"])


@pytest.mark.slow
def test_stage_under_torchrun_two_ranks(tmp_path):
    """2 CPU processes (gloo, DDP): each rank scores its share of the val images and the confusion matrices are
    reduced once; the reported mIoU equals an independent re-scoring of every written label map."""
    from localmim.synth import write_ade20k

    write_ade20k(tmp_path / "ade", seed=1, num_classes=4, sizes={"train": 8, "val": 3}, min_side=32, max_side=48,
                 quality=90)
    micro_encoder(tmp_path / "enc")
    (tmp_path / "params.yaml").write_text(json.dumps({"segment": {  # global batch 8: 2 ranks x 2 micro-batches of 2
        **TINY, "iters": 2, "global_batch": 8, "eval_every": 0, "ckpt_every": 2, "num_workers": 0}}))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "localmim.cli",
           "segment", "--encoder", "enc", "--data", "ade", "--out", "seg", "--metrics", "m.json", "--ckpt-dir", "ck",
           "--no-progress", "--params", "params.yaml"]
    p = subprocess.run(cmd, cwd=tmp_path, env=cli_env(LOCALMIM_TRACKING="0"), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["world_size"] == 2 and m["val_images"] == 3 and m["iters"] == 2
    base = tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "validation"
    preds, gts = [], []
    for ann in sorted(base.glob("*.png")):
        gt = np.asarray(Image.open(ann))
        preds.append(np.asarray(Image.open(tmp_path / "seg" / "pred" / ann.name)).astype(int) - 1)
        gts.append(np.where(gt == 0, 255, gt.astype(int) - 1))
    assert m["mIoU"] == pytest.approx(_numpy_scores(preds, gts, 4)["mIoU"], rel=1e-9)

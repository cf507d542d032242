"""The embedded mini datasets: real on-disk layouts, loadable by the real loaders, consistent with the pixels,
byte-identical for the same seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localmim import synth
from tests.conftest import ROOT, run_cli

TINY = dict(
    num_classes=10, train_per_class=3, val_per_class=2, min_side=40, max_side=96, seg_classes=5, seg_train=4,
    seg_val=2, coco_train=6, coco_val=3, jpeg_quality=90, dense_min_side=56, dense_max_side=120,
)  # fmt: skip


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate_all(out, seed=0, **TINY)
    return out


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """The same datasets drawn white-on-black (texture and background patched), so that the drawn pixels can
    be recovered by thresholding the JPEGs, independently of the polygons and masks the generator wrote."""
    mp = pytest.MonkeyPatch()
    mp.setattr(synth.draw, "_background", lambda rng, w, h: np.zeros((h, w, 3)))
    mp.setattr(synth.draw, "_texture", lambda rng, colour, w, h: np.full((h, w, 3), 255.0))
    out = tmp_path_factory.mktemp("flat")
    synth.generate_all(out, seed=1, **{**TINY, "jpeg_quality": 100})
    mp.undo()
    return out


def _dilate(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    return np.any([p[1 + dy : p.shape[0] - 1 + dy, 1 + dx : p.shape[1] - 1 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)  # fmt: skip


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_imagenet_layout_classes_and_sizes(tiny):
    root = tiny / "imagenet"
    for split, per_class in (("train", 3), ("val", 2)):
        dirs = sorted(p.name for p in (root / split).iterdir())
        assert dirs == [f"n{i:08d}_{k}" for i, k in enumerate(synth.SHAPE_NAMES[:10])]
        assert dirs[:3] == ["n00000000_circle", "n00000001_square", "n00000002_triangle"]
        for d in dirs:
            files = sorted((root / split / d).iterdir())
            assert len(files) == per_class and all(f.suffix == ".JPEG" for f in files)
    sizes = [Image.open(p).size for p in root.rglob("*.JPEG")]
    assert all(Image.open(p).format == "JPEG" and Image.open(p).mode == "RGB" for p in root.rglob("*.JPEG"))
    assert all(40 <= s <= 96 for wh in sizes for s in wh)
    assert len({w / h for w, h in sizes}) > 10 and any(w != h for w, h in sizes)  # varying size and aspect


def test_dense_sides_bound_ade20k_and_coco_only(tiny):
    imagenet = [s for p in (tiny / "imagenet").rglob("*.JPEG") for s in Image.open(p).size]
    dense = [s for d in ("ade20k", "coco") for p in (tiny / d).rglob("*.jpg") for s in Image.open(p).size]
    assert len(dense) == 2 * (6 + 9) and all(56 <= s <= 120 for s in dense)
    assert any(s < 56 for s in imagenet) and all(40 <= s <= 96 for s in imagenet)  # min_side/max_side: ImageNet


def test_same_seed_byte_identical_other_seed_differs(tiny, tmp_path):
    synth.generate_all(tmp_path / "a", seed=0, **TINY)
    synth.generate_all(tmp_path / "b", seed=7, **TINY)
    ref, same, other = _tree_digest(tiny), _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert len(ref) == 10 * 5 + 6 * 2 + 9 + 2  # imagenet + ade (jpg+png) + coco jpgs + 2 coco jsons
    assert same == ref
    assert other.keys() == ref.keys() and sum(other[k] != ref[k] for k in ref) >= len(ref) - 2


def test_imagenet_drawn_shape_fills_a_plausible_area(flat):
    """Each image holds one shape of its class: a single blob covering a size-dependent share of the image."""
    for p in (flat / "imagenet" / "train").rglob("*.JPEG"):
        fg = np.asarray(Image.open(p).convert("L")) > 128
        frac = fg.mean()
        # radius 0.28..0.45 of the short side; a thin/star shape still covers a few percent
        assert 0.02 < frac < 0.65, (p, frac)
        ys, xs = np.nonzero(fg)
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < fg.shape[0] - 1 and xs.max() < fg.shape[1] - 1


def test_ade20k_annotations_match_pixels(flat):
    base = flat / "ade20k" / "ADEChallengeData2016"
    for split, tag, n in (("training", "train", 4), ("validation", "val", 2)):
        imgs = sorted((base / "images" / split).glob("*.jpg"))
        anns = sorted((base / "annotations" / split).glob("*.png"))
        assert [p.stem for p in imgs] == [p.stem for p in anns] == [f"ADE_{tag}_{i:08d}" for i in range(1, n + 1)]
        for ip, ap in zip(imgs, anns, strict=True):
            ann = Image.open(ap)
            assert ann.mode == "L" and ann.size == Image.open(ip).size
            a = np.asarray(ann)
            assert a.max() <= 5 and a.max() >= 1  # 0 = other, 1..C classes
            fg = np.asarray(Image.open(ip).convert("L")) > 128
            assert _iou(a > 0, fg) > 0.9


def test_coco_loads_with_pycocotools_and_matches_pixels(flat):
    from pycocotools.coco import COCO

    cats_seen = set()
    for split in ("train2017", "val2017"):
        coco = COCO(str(flat / "coco" / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synth.SHAPE_NAMES[:5])
        assert len(coco.getImgIds()) == (6 if split == "train2017" else 3)
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            pix = np.asarray(Image.open(flat / "coco" / split / info["file_name"]).convert("L"))
            assert pix.shape == (info["height"], info["width"])
            fg = pix > 128
            union = np.zeros_like(fg)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert anns, "every image has at least one object"
            for ann in anns:
                assert ann["iscrowd"] == 0 and len(ann["segmentation"]) == 1
                cats_seen.add(ann["category_id"])
                m = coco.annToMask(ann).astype(bool)
                x, y, w, h = ann["bbox"]
                # the object's own pixels: thresholded image within 1 px of the annotation (objects are > 1 px apart)
                own = fg & _dilate(m)
                # boundary pixels blur in the JPEG: small objects get a looser bound
                assert _iou(m, own) > (0.9 if own.sum() >= 150 else 0.7), (info["file_name"], ann["id"])
                ys, xs = np.nonzero(own)
                # bbox = polygon extent: encloses the pixels; sharp tips may reach a little beyond them
                lo, hi = np.array([xs.min(), ys.min()]) - [x, y], [x + w, y + h] - np.array([xs.max(), ys.max()]) - 1
                assert (lo >= -1).all() and (hi >= -1).all() and (lo <= 3).all() and (hi <= 3).all(), (lo, hi)
                assert abs(ann["area"] - own.sum()) <= 0.1 * own.sum() + 4
                union |= m
            assert _iou(union, fg) > 0.85  # no drawn object without an annotation
    assert len(cats_seen) >= 3


def test_failure_leaves_no_partial_dataset(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth.datasets, "write_coco", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate_all(tmp_path, seed=0, **TINY)
    assert list(tmp_path.iterdir()) == []  # no imagenet/ade20k that looks complete, no temp dir left


def test_rerun_replaces_outputs_and_removes_stale_temp_dirs(tiny, tmp_path):
    (tmp_path / ".synth.tmp-99999" / "imagenet").mkdir(parents=True)  # left by a killed run
    (tmp_path / "imagenet" / "train" / "n00000099_old").mkdir(parents=True)  # an older, different dataset
    synth.generate_all(tmp_path, seed=0, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ade20k", "coco", "imagenet"]
    assert _tree_digest(tmp_path / "imagenet") == _tree_digest(tiny / "imagenet")


def test_bad_class_count_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"num_classes=21"):
        synth.generate_all(tmp_path, seed=0, **{**TINY, "num_classes": 21})


def test_cli_synth(tiny, tmp_path):
    out = tmp_path / "raw"
    sets = [f"--set=synth.{k}={v}" for k, v in TINY.items()]
    p = run_cli("synth", str(out), "--seed", "0", "--params", str(ROOT / "params.yaml"), *sets, cwd=tmp_path,
                LOCALMIM_TRACKING="0")  # fmt: skip
    assert p.returncode == 0, p.stderr
    for name in ("imagenet", "ade20k", "coco"):  # CLI == library, same seed (the dense sides reach the library)
        assert _tree_digest(out / name) == _tree_digest(tiny / name), name
    assert json.loads((out / "synth.json").read_text())["counts"]["imagenet_train"] == 30
    assert "seed: 0" in (out / "synth.params.yaml").read_text()
    assert not list(out.glob(".*"))



def _edge_shape_features(path: Path) -> np.ndarray:
    """Rotation/translation/scale-tolerant edge statistics around the edge centroid (no knowledge of the generator):
    radial edge-energy profile, edge orientation relative to the radius, angular spectrum magnitudes."""
    g = np.asarray(Image.open(path).convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64)
    gy, gx = np.gradient(g)
    w = np.hypot(gx, gy)
    w /= w.sum() + 1e-9
    yy, xx = np.mgrid[0:32, 0:32]
    cy, cx = (w * yy).sum(), (w * xx).sum()
    r, th = np.hypot(yy - cy, xx - cx), np.arctan2(yy - cy, xx - cx)
    radial = np.histogram(r / ((w * r).sum() + 1e-9), bins=12, range=(0, 2.5), weights=w)[0]
    orient = np.histogram(np.cos(2 * (np.arctan2(gy, gx) - th)), bins=8, range=(-1, 1), weights=w)[0]
    spectrum = [abs((w * np.exp(1j * k * th)).sum()) for k in range(1, 9)]
    return np.concatenate([radial, orient, spectrum])


def test_class_is_decidable_from_content(tmp_path):
    """A linear classifier on generic edge statistics beats chance (10%) by far: the label is in the pixels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    synth.write_imagenet(tmp_path, seed=0, num_classes=10, per_class={"train": 30, "val": 10}, min_side=48,
                         max_side=160, quality=90)  # fmt: skip
    data = {}
    for split in ("train", "val"):
        paths = sorted((tmp_path / split).rglob("*.JPEG"))
        data[split] = np.stack([_edge_shape_features(p) for p in paths]), [p.parent.name for p in paths]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(*data["train"])
    acc = float(np.mean(clf.predict(data["val"][0]) == np.array(data["val"][1])))
    assert acc > 0.3, acc


@pytest.mark.parametrize("kind", synth.SHAPE_NAMES)
def test_every_shape_rasterizes_like_pycocotools(kind):
    """The painted mask of each outline (ring with its keyhole seam included) is what pycocotools decodes."""
    from pycocotools import mask as mask_utils

    outline = synth.shape_outline(kind, 40.3, 35.7, 30, 0.7, 1.05).round(2)
    painted = synth.polygon_mask(outline, 80, 70)
    coco = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([outline.reshape(-1).tolist()], 70, 80)))
    assert _iou(painted, coco.astype(bool)) > 0.97
    assert 0.1 < painted.mean() < 0.6

"""COCO data for `detect` (method §9.2): annotation checks with reasons and reconciled counts, LSJ augmentation,
images without objects, and the evaluation path against pycocotools on written files and hand-computed APs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from localmim.data.dense.coco import CocoError, coco_dataset, collate, load_coco
from localmim.data.dense.coco_transforms import eval_transforms, train_transforms
from localmim.eval.detection import METRIC_NAMES, coco_eval, to_coco_results
from tests.coco_data import hand_coco, synth_coco

# ------------------------------------------------------------------------------------------ bad input


def _mutate(ann_file: Path, fn) -> None:
    doc = json.loads(ann_file.read_text())
    fn(doc)
    ann_file.write_text(json.dumps(doc))


def _set_ann(key, value, idx=0):
    def fn(doc):
        doc["annotations"][idx][key] = value
    return fn


BAD = {
    "image not listed": (_set_ann("image_id", 77), "annotation", 1, "not in 'images'"),
    "zero-width box": (_set_ann("bbox", [10, 10, 0, 20]), "annotation", 1, "non-positive width"),
    "box outside image": (_set_ann("bbox", [90, 10, 30, 20]), "annotation", 1, "outside"),
    "unknown category": (_set_ann("category_id", 9), "annotation", 1, "not in 'categories'"),
    "odd polygon": (_set_ann("segmentation", [[1, 2, 3, 4, 5]]), "annotation", 1, "malformed polygon"),
    "short polygon": (_set_ann("segmentation", [[1, 2, 3, 4]]), "annotation", 1, "malformed polygon"),
    "polygon text": (_set_ann("segmentation", [["a", 2, 3, 4, 5, 6]]), "annotation", 1, "malformed polygon"),
    "RLE wrong size": (_set_ann("segmentation", {"counts": "abc", "size": [1, 1]}), "annotation", 1, "RLE"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("on_bad", ["skip", "fail"])
def test_each_bad_annotation_is_skipped_with_its_reason_or_fails_naming_it(tmp_path, case, on_bad):
    ann_file = hand_coco(tmp_path)
    fn, kind, id_, needle = BAD[case]
    _mutate(ann_file, fn)
    if on_bad == "fail":
        with pytest.raises(CocoError, match=rf"instances_val2017.json: {kind} id {id_}: .*{needle}"):
            load_coco(tmp_path, "val", "fail")
        return
    split = load_coco(tmp_path, "val", "skip")
    rep = split.report
    assert [(s["kind"], s["id"]) for s in rep.skipped] == [(kind, id_)] and needle in rep.skipped[0]["reason"]
    assert (rep.annotations_found, rep.annotations_used, rep.images_used) == (2, 1, 2) and rep.reconciles()
    assert sorted(split.coco.anns) == [2]


@pytest.mark.parametrize("on_bad", ["skip", "fail"])
def test_a_file_that_is_not_an_image_skips_the_image_and_its_annotations(tmp_path, on_bad):
    hand_coco(tmp_path)
    (tmp_path / "val2017" / "000000000001.jpg").write_bytes(b"this is not a jpeg")
    if on_bad == "fail":
        with pytest.raises(CocoError, match=r"image id 1: .*000000000001.jpg: not an image"):
            load_coco(tmp_path, "val", "fail")
        return
    rep = load_coco(tmp_path, "val").report
    assert rep.skipped[0] == {"kind": "image", "id": 1, "reason": rep.skipped[0]["reason"]}
    assert "not an image" in rep.skipped[0]["reason"]
    assert [s["id"] for s in rep.skipped[1:]] == [1, 2] and all("was skipped" in s["reason"] for s in rep.skipped[1:])
    assert (rep.images_found, rep.images_used, rep.annotations_used) == (2, 1, 0) and rep.reconciles()


def test_missing_image_file_and_missing_layout(tmp_path):
    hand_coco(tmp_path)
    (tmp_path / "val2017" / "000000000002.jpg").unlink()
    rep = load_coco(tmp_path, "val").report
    assert rep.skipped == [{"kind": "image", "id": 2, "reason": rep.skipped[0]["reason"]}]
    assert "missing" in rep.skipped[0]["reason"] and rep.reconciles()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        load_coco(tmp_path, "train")


def test_crowd_is_dropped_in_training_and_kept_for_evaluation(tmp_path):
    hand_coco(tmp_path, split="train", crowd=True)
    hand_coco(tmp_path, split="val", crowd=True)
    tr = load_coco(tmp_path, "train", "fail", train=True)
    assert sorted(tr.coco.anns) == [1, 2] and tr.report.skipped[0]["id"] == 3 and tr.report.reconciles()
    assert "crowd" in tr.report.skipped[0]["reason"]
    assert sorted(load_coco(tmp_path, "val", "fail").coco.anns) == [1, 2, 3]


# -------------------------------------------------------------------------------- samples / augmentation


def test_image_without_objects_gives_empty_targets(tmp_path):
    hand_coco(tmp_path, split="train")
    split = load_coco(tmp_path, "train", train=True)
    for tf in (eval_transforms(split), train_transforms(split, "lsj", 64, (0.1, 2.0)),
               train_transforms(split, "multiscale", 64, (1.0, 1.0))):
        image, target = coco_dataset(split, tf)[1]  # image 2 has no annotations
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["masks"].shape == (0, *image.shape[-2:])
    images, targets = collate([coco_dataset(split, eval_transforms(split))[i] for i in (0, 1)])
    assert [t["image_id"] for t in targets] == [1, 2] and targets[0]["labels"].tolist() == [1, 2]
    assert images[0].dtype == torch.float32 and 0 <= images[0].min() and images[0].max() <= 1


def test_lsj_keeps_boxes_inside_and_masks_aligned_with_boxes(tmp_path):
    split = load_coco(synth_coco(tmp_path, train=6, val=1), "train", train=True)
    size = 48
    ds = coco_dataset(split, train_transforms(split, "lsj", size, (0.1, 2.0)))
    torch.manual_seed(0)
    n_boxes = 0
    for _ in range(4):
        for i in range(len(ds)):
            image, t = ds[i]
            assert image.shape == (3, size, size)
            boxes, masks = t["boxes"].numpy(), t["masks"].numpy().astype(bool)  # [N, 4], [N, S, S]
            assert len(boxes) == len(masks) == len(t["labels"])
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            for b, m in zip(boxes, masks, strict=True):
                ys, xs = np.nonzero(m)  # independent extent: first/last painted pixel, box edges one past
                assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == b.tolist()
            n_boxes += len(boxes)
    assert n_boxes > 10


def test_eval_samples_keep_the_original_size_and_polygon_masks(tmp_path):
    ann = hand_coco(tmp_path)
    split = load_coco(tmp_path, "val")
    image, t = coco_dataset(split, eval_transforms(split))[0]
    assert image.shape == (3, 80, 100)
    assert t["boxes"].tolist() == [[10, 10, 30, 30], [50, 30, 80, 55]]
    from pycocotools.coco import COCO

    ref = COCO(str(ann))
    for k, m in enumerate(t["masks"]):
        assert np.array_equal(m.numpy(), ref.annToMask(ref.anns[k + 1]))


# --------------------------------------------------------------------------------------- evaluation


def _gt_outputs(split) -> list[tuple[int, dict]]:
    """Ground truth of every val image as detector outputs (score 1, masks as probabilities)."""
    out = []
    for _image, t in coco_dataset(split, eval_transforms(split)):
        out.append((t["image_id"], {"boxes": t["boxes"].as_subclass(torch.Tensor).float(), "labels": t["labels"],
                                    "scores": torch.ones(len(t["labels"])),
                                    "masks": t["masks"].as_subclass(torch.Tensor)[:, None].float()}))
    return out


def test_ground_truth_as_detections_scores_ap_one_and_matches_pycocotools_on_the_file(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = synth_coco(tmp_path / "coco", train=1, val=6)
    split = load_coco(root, "val", "fail")
    results = [r for iid, o in _gt_outputs(split) for r in to_coco_results(iid, o, split.label_to_cat)]
    ours = coco_eval(split.coco, results)
    for t in ("bbox", "segm"):
        assert ours[f"{t}_AP"] == pytest.approx(1.0) and ours[f"{t}_AP50"] == pytest.approx(1.0)
        assert all(ours[f"{t}_{m}"] in (pytest.approx(1.0), -1.0) for m in METRIC_NAMES)
    res_file = tmp_path / "det.json"
    res_file.write_text(json.dumps(results))
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    for t in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(str(res_file)), t)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert [ours[f"{t}_{m}"] for m in METRIC_NAMES] == pytest.approx(list(ev.stats[:6]), abs=0)


def test_one_of_two_objects_found_gives_the_hand_computed_ap(tmp_path):
    """Object 1 found exactly (score 0.9), object 2 missed: recall 1/2 at precision 1 for every IoU threshold.
    Per category: category 1 has AP 1, category 2 (missed) AP 0 -> mean 0.5. One category: 51 of the 101 recall
    points have precision 1 -> 51/101."""
    hand_coco(tmp_path)
    split = load_coco(tmp_path, "val")
    mask = torch.zeros(1, 1, 80, 100)
    mask[0, 0, 10:30, 10:30] = 1
    out = {"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
           "masks": mask}
    ours = coco_eval(split.coco, to_coco_results(1, out, split.label_to_cat))
    for t in ("bbox", "segm"):
        assert ours[f"{t}_AP"] == pytest.approx(0.5) and ours[f"{t}_AP75"] == pytest.approx(0.5)
    # both objects in one category: relabel the second ground-truth object
    doc = json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())
    doc["annotations"][1]["category_id"] = 1
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    split = load_coco(tmp_path, "val")
    ours = coco_eval(split.coco, to_coco_results(1, out, split.label_to_cat), iou_types=("bbox",))
    assert ours["bbox_AP"] == pytest.approx(51 / 101) and ours["bbox_AP50"] == pytest.approx(51 / 101)


def test_box_at_iou_062_counts_at_three_of_ten_thresholds(tmp_path):
    """Ground truth [10, 10, 30x30] (image 1, category 1 after dropping the other object); detection
    [10, 10, 30 x 18.6]: IoU = 18.6 / 30 = 0.62 >= 0.50, 0.55, 0.60 only -> AP = 3/10, AP50 = 1, AP75 = 0."""
    ann = hand_coco(tmp_path)
    doc = json.loads(ann.read_text())
    doc["annotations"] = [{**doc["annotations"][0], "bbox": [10, 10, 30, 30], "area": 900.0,
                           "segmentation": [[10, 10, 40, 10, 40, 40, 10, 40]]}]
    ann.write_text(json.dumps(doc))
    split = load_coco(tmp_path, "val")
    out = {"boxes": torch.tensor([[10.0, 10, 40, 28.6]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    ours = coco_eval(split.coco, to_coco_results(1, out, split.label_to_cat), iou_types=("bbox",))
    assert ours["bbox_AP"] == pytest.approx(0.3) and ours["bbox_AP50"] == pytest.approx(1.0)
    assert ours["bbox_AP75"] == pytest.approx(0.0)


def test_no_detections_scores_zero(tmp_path):
    hand_coco(tmp_path)
    assert set(coco_eval(load_coco(tmp_path, "val").coco, []).values()) == {0.0}


def test_picture_draws_masks_and_boxes_above_the_threshold():
    from localmim.eval.detection import render

    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    masks = torch.zeros(2, 1, 40, 80)
    masks[0, 0, 10:20, 10:30] = 1
    masks[1, 0, 10:20, 50:70] = 1
    out = {"boxes": torch.tensor([[10.0, 10, 30, 20], [50, 10, 70, 20]]), "labels": torch.tensor([1, 2]),
           "scores": torch.tensor([0.9, 0.1]), "masks": masks}
    grid = render([(image, out)], {1: "a", 2: "b"}, {1: 1, 2: 2}, score_threshold=0.3, size=80)
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    tile = grid[:, 2:42, 2:82]  # make_grid pads by 2
    assert tile[:, 12:18, 12:28].float().mean() > 20  # the kept detection's mask is painted
    assert tile[:, 12:18, 52:68].max() == 0  # the one below the threshold is not

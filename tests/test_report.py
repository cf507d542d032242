"""`localmim report`: each headline number next to the baselines its stage wrote, and those baselines checked
against independent computations (NumPy float64 for segmentation, pycocotools on hand-made files for detection)."""

from __future__ import annotations

import json
from argparse import Namespace

import numpy as np
import pytest
import torch

from localmim.eval.segmentation import baseline_scores
from tests.coco_data import hand_coco


def test_segmentation_baselines_match_numpy():
    """Majority class everywhere and uniformly random labels, on ground-truth counts with an absent class."""
    gt = np.array([50.0, 30.0, 0.0, 20.0])  # labelled pixels per class; class 2 absent from the ground truth
    cm = torch.zeros(4, 4, dtype=torch.int64)
    cm[:, 1] = torch.tensor(gt, dtype=torch.int64)  # any predictions: only the row sums matter
    got = baseline_scores(cm)
    total, k = gt.sum(), len(gt)
    # majority (class 0) everywhere: IoU_0 = 50/100, classes 1 and 3 IoU 0, class 2 left out (no gt, no pred)
    assert got["mIoU_majority"] == pytest.approx(100 * (gt[0] / total) / 3)
    # uniform: TP_c = n_c/K, predicted_c = total/K; every class is predicted, so the absent one counts with IoU 0
    iou = (gt / k) / (gt + total / k - gt / k)
    assert got["mIoU_chance"] == pytest.approx(100 * iou.mean())


def _scaled_val(root, factor: int) -> dict:
    """``hand_coco`` val at ``factor`` x the train size with the same objects at the same relative places."""
    hand_coco(root, "val", size=(100 * factor, 80 * factor))
    path = root / "annotations" / "instances_val2017.json"
    doc = json.loads(path.read_text())
    for a in doc["annotations"]:
        a["bbox"] = [factor * v for v in a["bbox"]]
        a["segmentation"] = [[factor * v for v in p] for p in a["segmentation"]]
        a["area"] *= factor**2
    path.write_text(json.dumps(doc))
    return doc


def test_detection_prior_rescales_training_boxes_to_each_val_image(tmp_path):
    """The prior guesses the training boxes in relative coordinates on every val image: a val set twice the size
    with the objects at the same relative places scores AP 1 under pycocotools reading the written results file
    (the empty val image only gets unmatched guesses, which do not lower AP: it has no ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from localmim.data.dense.coco import load_coco
    from localmim.eval.detection import prior_results

    hand_coco(tmp_path / "tr", "train", size=(100, 80))
    doc = _scaled_val(tmp_path / "va", 2)
    train, val = load_coco(tmp_path / "tr", "train"), load_coco(tmp_path / "va", "val")
    res = prior_results(train.coco, val.coco)
    assert len(res) == 2 * 2  # two training objects on each of the two val images
    assert sorted(r["bbox"] for r in res if r["image_id"] == 1) == sorted(a["bbox"] for a in doc["annotations"])
    (tmp_path / "res.json").write_text(json.dumps(res))
    gt = COCO(str(tmp_path / "va" / "annotations" / "instances_val2017.json"))
    for t in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "res.json")), t)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), t


def test_detection_prior_misses_objects_elsewhere(tmp_path):
    """The prior can lose: val objects at other relative places than the training ones score AP 0."""
    from localmim.data.dense.coco import load_coco
    from localmim.eval.detection import coco_eval, prior_results

    hand_coco(tmp_path / "tr", "train", size=(100, 80))
    doc = _scaled_val(tmp_path / "va", 1)
    for a in doc["annotations"]:  # move every object to the bottom-right corner
        a["bbox"] = [80.0, 60.0, 15.0, 15.0]
        a["segmentation"] = [[80.0, 60.0, 95.0, 60.0, 95.0, 75.0, 80.0, 75.0]]
        a["area"] = 225.0
    (tmp_path / "va" / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    train, val = load_coco(tmp_path / "tr", "train"), load_coco(tmp_path / "va", "val")
    m = coco_eval(val.coco, prior_results(train.coco, val.coco))
    assert m["bbox_AP50"] == 0.0 and m["segm_AP50"] == 0.0


def test_report_prints_headlines_next_to_their_baselines(tmp_path, capsys):
    from localmim.pipeline.results import report

    metrics = {
        "segment": {"mIoU": 31.3, "mIoU_majority": 1.5, "mIoU_chance": 6.0, "mAcc": 40.0},
        "detect": {"bbox_AP": 0.05, "bbox_AP50": 0.125, "bbox_AP50_prior": 0.003, "segm_AP": 0.04},
        "linprobe": {"top1": 42.0, "chance_top1": 10.0},
    }
    for stage, m in metrics.items():
        (tmp_path / f"{stage}.json").write_text(json.dumps(m))
    (tmp_path / "detect.timing.json").write_text(json.dumps({"seconds": 3.0}))  # a measurement, never shown
    assert report(Namespace(metrics_dir=str(tmp_path), out=None, all=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln for ln in lines if ln.startswith("| ")}
    assert "| 31.3 |" in row[("segment", "mIoU (%)")]
    assert "most frequent class 1.5; uniform random class 6.0" in row[("segment", "mIoU (%)")]
    assert "| 12.5 |" in row[("detect", "bbox_AP50 (%)")]  # pycocotools' 0-1 shown in percent
    assert "training boxes, image unseen 0.3" in row[("detect", "bbox_AP50 (%)")]
    assert row[("detect", "segm_AP (%)")].rstrip().endswith("| - |")  # no baseline written: none shown
    assert "chance 10.0" in row[("linprobe", "top1 (%)")]
    assert ("segment", "mAcc") not in row and not any("seconds" in ln for ln in lines)  # not headline metrics
    order = [k for k in row if k[0] != "stage"]
    assert [s for s, _ in order] == ["linprobe", "segment", "detect", "detect", "detect"]  # DAG order

    assert report(Namespace(metrics_dir=str(tmp_path), out=None, all=True)) == 0
    assert "mAcc" in capsys.readouterr().out  # --all lists every number


def test_report_plot_marks_each_headlines_baselines(tmp_path):
    """The plot's baseline lines sit at the values of the metrics files (in percent, COCO's 0-1 x100, worked out
    here by hand), across the bar of their own headline; a bar at or below its best baseline is hatched."""
    from localmim.pipeline.results import collect, metrics_figure, report

    metrics = {
        "segment": {"mIoU": 31.3, "mIoU_majority": 1.5, "mIoU_chance": 6.0},
        "detect": {"bbox_AP": 0.002, "bbox_AP_prior": 0.005, "bbox_AP50": 0.125, "bbox_AP50_prior": 0.003,
                   "segm_AP": 0.04},
        "linprobe": {"top1": 42.0, "chance_top1": 10.0},
    }
    for stage, m in metrics.items():
        (tmp_path / f"{stage}.json").write_text(json.dumps(m))
    want = {  # gid -> (bar label, y in percent)
        "baseline:segment.mIoU:mIoU_majority": ("segment\nmIoU", 1.5),
        "baseline:segment.mIoU:mIoU_chance": ("segment\nmIoU", 6.0),
        "baseline:detect.bbox_AP:bbox_AP_prior": ("detect\nbbox_AP", 0.5),
        "baseline:detect.bbox_AP50:bbox_AP50_prior": ("detect\nbbox_AP50", 0.3),
        "baseline:linprobe.top1:chance_top1": ("linprobe\ntop1", 10.0),
    }
    fig = metrics_figure(collect(tmp_path))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    centers = {label: bar.get_x() + bar.get_width() / 2 for label, bar in zip(labels, ax.patches, strict=True)}
    lines = {ln.get_gid(): ln for ln in ax.get_lines() if (ln.get_gid() or "").startswith("baseline:")}
    assert set(lines) == set(want)  # segm_AP has no baseline written: no line
    for gid, (label, y) in want.items():
        xs, ys = lines[gid].get_data()
        assert list(ys) == pytest.approx([y, y]), gid
        assert min(xs) < centers[label] < max(xs) and max(xs) - min(xs) < 1, gid  # across its own bar only
    hatched = {label for label, bar in zip(labels, ax.patches, strict=True) if bar.get_hatch()}
    assert hatched == {"detect\nbbox_AP"}  # 0.2 % <= its prior's 0.5 %; every other bar beats its baselines
    red = {t.get_text() for t in ax.get_xticklabels() if t.get_color() == "red"}
    assert red == hatched
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"baseline: chance", "baseline: most frequent class", "baseline: uniform random class",
            "baseline: training boxes, image unseen", "hatched, red label: not above its baseline"} == legend

    assert report(Namespace(metrics_dir=str(tmp_path), out=str(tmp_path / "out"), all=False)) == 0
    assert (tmp_path / "out" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

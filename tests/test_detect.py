"""Mask R-CNN on the exported encoder (method §9.2): backbone pyramids, training step with empty images, layer
decay, resume after SIGKILL, no resume across params or encoders, schedule, and the `detect` stage through the CLI on
the synth layout."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localmim.models.detection import DetectionBackbone, DetectorSpec, build_mask_rcnn
from localmim.models.encoder_io import EncoderSpec, read_encoder
from localmim.train.schedule import DetSchedule
from tests.coco_data import hand_coco, synth_coco
from tests.conftest import cli_env, run_cli
from tests.encoders import micro_encoder
from tests.resume import kill_then_resume, same_weights

VIT16 = EncoderSpec("vit_base_patch16_224", {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2,
                                             "num_heads": 2}, {})
VIT8 = EncoderSpec("vit_base_patch16_224", {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                            "num_heads": 2}, {})
SWIN4 = EncoderSpec("swin_tiny_patch4_window7_224", {"img_size": 64, "patch_size": 4, "embed_dim": 16,
                                                     "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                                                     "window_size": 2}, {})


@pytest.mark.parametrize("enc", [VIT16, VIT8, SWIN4], ids=["vit_p16", "vit_p8", "swin_p4"])
def test_backbone_maps_have_strides_4_to_32_and_256_channels(enc):
    torch.manual_seed(0)
    bb = DetectionBackbone(enc, 64, pretrained=False)
    for h, w in [(64, 64), (64, 96)]:
        feats = bb(torch.randn(2, 3, h, w))
        assert list(feats) == ["0", "1", "2", "3", "pool"]
        for (name, f), s in zip(feats.items(), (4, 8, 16, 32, 64), strict=True):
            assert tuple(f.shape) == (2, 256, -(-h // s), -(-w // s)), name  # P6: stride-2 subsampling, ceil
    assert bb.out_channels == 256


def test_windowed_vit_backbone_same_maps_other_values_swin_refused():
    """``window_size`` (ViTDet windowed attention) keeps the pyramid's shapes and the parameter names; with a window
    smaller than the grid the block-1 features change (block 0 windowed, block 1 global: ViTDet's default for
    depth 2 keeps both global, so the test names its global block)."""
    torch.manual_seed(0)
    plain = DetectionBackbone(VIT8, 64, pretrained=False)
    torch.manual_seed(0)
    win = DetectionBackbone(VIT8, 64, pretrained=False, window_size=4, global_blocks=[1])
    assert [n for n, _ in win.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randn(1, 3, 64, 96)  # grid 8 x 12: 2 x 3 windows
    a, b = plain(x), win(x)
    assert [f.shape for f in a.values()] == [f.shape for f in b.values()]
    assert not torch.allclose(a["0"], b["0"])
    with pytest.raises(ValueError, match="Swin"):
        DetectionBackbone(SWIN4, 64, pretrained=False, window_size=4)


def test_vitdet_pyramid_for_patch_16():
    """ViTDet: stride 4 by two 2x2 transposed convs (norm + GELU between), 8 by one, 16 identity, 32 by 2x2
    max-pool; every level ends with 1x1 and 3x3 convs to 256 channels, each followed by a norm."""
    neck = DetectionBackbone(VIT16, 64, pretrained=False).neck
    kinds = [[type(m).__name__ for m in level] for level in neck.levels]
    tail = ["Conv2d", "LayerNorm2d", "Conv2d", "LayerNorm2d"]
    assert kinds == [["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", *tail],
                     ["ConvTranspose2d", *tail], tail, ["MaxPool2d", *tail]]
    assert [lvl[-2].kernel_size for lvl in neck.levels] == [(3, 3)] * 4


def test_swin_stage_outputs_each_get_a_fresh_layer_norm(tmp_path):
    enc = read_encoder(micro_encoder(tmp_path / "enc", "swin"))
    bb = DetectionBackbone(enc, 64)
    assert len(bb.neck.norms) == 4 and [n.normalized_shape[0] for n in bb.neck.norms] == bb.body.out_channels
    key = "layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(bb.body.encoder.state_dict()[key], enc.state_dict[key])  # pretrained weights loaded


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_training_step_with_an_empty_image_and_layer_decay(tmp_path, family):
    """Every parameter gets a gradient (no unused ones under DDP), an image without objects trains, and the
    encoder's groups follow method §8.1 under the ``backbone.body.encoder.`` prefix."""
    from localmim.data.dense.coco import coco_dataset, collate, load_coco
    from localmim.data.dense.coco_transforms import train_transforms
    from localmim.models.layer_decay import param_groups_with_decay

    hand_coco(tmp_path / "coco", split="train")
    split = load_coco(tmp_path / "coco", "train", train=True)
    enc = read_encoder(micro_encoder(tmp_path / "enc", family))
    torch.manual_seed(0)
    model = build_mask_rcnn(enc, DetectorSpec(num_classes=2, image_size=64, box_head_dim=32, mask_head_channels=8))
    images, targets = collate([coco_dataset(split, train_transforms(split, "lsj", 64, (0.8, 1.2)))[i] for i in (0, 1)])
    assert len(targets[1]["boxes"]) == 0
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert math.isfinite(loss.item())
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    groups = param_groups_with_decay(model, model.backbone.body.encoder, "backbone.body.encoder.", 0.1, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    top = max(g["layer_id"] for g in groups)
    assert scale[id(named["backbone.body.encoder.patch_embed.proj.weight"])] == pytest.approx(0.5 ** top)
    assert scale[id(named["roi_heads.box_predictor.cls_score.weight"])] == 1.0
    assert scale[id(named["backbone.neck.norms.0.weight" if family == "swin" else
                           "backbone.neck.levels.0.0.weight"])] == 1.0


def test_schedule_warmup_and_steps():
    s = DetSchedule(1e-3, 100, warmup_iters=10, kind="step", milestones=(0.5, 0.9))
    assert s(0) == pytest.approx(1e-6) and s(5) == pytest.approx(1e-3 * (0.001 * 0.5 + 0.5))
    assert s(10) == pytest.approx(1e-3) and s(49) == pytest.approx(1e-3)
    assert s(50) == pytest.approx(1e-4) and s(90) == pytest.approx(1e-5)
    c = DetSchedule(1e-3, 100, kind="cosine", min_lr=1e-5)
    assert c(0) == pytest.approx(1e-3) and c(50) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2) and c(100) == 1e-5


# ---------------------------------------------------------------------------------------------- resume

# the tiny detector of the resume tests: 32 px LSJ (scale 0.5-1.5), narrow heads
TINY = dict(image_size=32, scale_range=[0.5, 1.5], epochs=2, global_batch=2, batch_size=2, warmup_iters=2,
            box_head_dim=32, mask_head_channels=8, rpn_batch_size_per_image=32, box_batch_size_per_image=16,
            num_workers=0, device="cpu", log_every=1, vis_images=0)

SCRIPT = """
import os, signal, sys, torch
from localmim.config.detect import DetectConfig
from localmim.data.dense.coco import load_coco
from localmim.models.encoder_io import read_encoder
from localmim.train.detect import run_detect
root, enc_dir, ckpt_dir, out = sys.argv[1:5]
cfg = DetectConfig(**{cfg})
def log_fn(metrics, step):
    if os.environ.get("KILL") == str(step):  # the step whose log point kills the run
        os.kill(os.getpid(), signal.SIGKILL)
tr, va = load_coco(root, "train", train=True), load_coco(root, "val")
r = run_detect(cfg, read_encoder(enc_dir), tr, va, ckpt_dir, log_fn=log_fn, progress=False)
ap = {{k: v for k, v in r.metrics.items() if k.startswith(("bbox_", "segm_"))}}
torch.save({{"state": r.model.state_dict(), "metrics": ap, "epochs": r.metrics["epochs_done"]}}, out)
"""


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    """Killed at the last step of epoch 1 (4 images, global batch 2 in 2 micro-batches of 1: 2 steps per epoch), the
    run resumes the mid-epoch checkpoint of step 3 (``ckpt_minutes`` due at every log point) at optimizer step 1 of
    the epoch, and ends bit-identical to the uninterrupted run (``num_workers = 0``: the augmentation draws from the
    restored RNG)."""
    from localmim.runtime import checkpoint as ckpt

    root = synth_coco(tmp_path / "coco", train=4, val=2)
    enc = micro_encoder(tmp_path / "enc")

    def checkpointed() -> None:
        (run_dir,) = (tmp_path / "ck_a").iterdir()
        assert ckpt.find_latest(run_dir) is not None and not (tmp_path / "a.pt").exists()

    cfg = {**TINY, "batch_size": 1, "ckpt_minutes": 1e-6}
    resumed, _ = kill_then_resume(tmp_path, SCRIPT.format(cfg=repr(cfg)), lambda t: [
        str(root), str(enc), str(tmp_path / f"ck_{t}"), str(tmp_path / f"{t}.pt")], {"KILL": "4"},
        after_kill=checkpointed)
    assert "resumed from" in resumed and "(epoch 1, step 3)" in resumed
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["epochs"] == b["epochs"] == 2
    assert same_weights(a["state"], b["state"]) and a["metrics"] == b["metrics"]  # bit-identical on CPU
    init = read_encoder(enc).state_dict["blocks.0.attn.qkv.weight"]
    assert not torch.equal(init, a["state"]["backbone.body.encoder.blocks.0.attn.qkv.weight"])


def test_other_params_or_another_encoder_never_resume(tmp_path, capsys):
    """As for segment, pretrain and finetune: the same params and encoder resume the finished run (same weights);
    other params, or another encoder, start afresh in their own run directory (the weights of a fresh run in an
    empty directory), leaving the first run's checkpoint intact."""
    from localmim.config.detect import DetectConfig
    from localmim.data.dense.coco import load_coco
    from localmim.runtime import checkpoint as ckpt
    from localmim.train.detect import run_detect

    root = synth_coco(tmp_path / "coco", train=2, val=1)
    tr, va = load_coco(root, "train", train=True), load_coco(root, "val")
    cfg = DetectConfig(**{**TINY, "epochs": 1})
    encs = {s: read_encoder(micro_encoder(tmp_path / f"enc{s}", seed=s)) for s in (0, 1)}

    def run(c, enc, ck: str = "ck"):
        capsys.readouterr()
        r = run_detect(c, enc, tr, va, tmp_path / ck, progress=False)
        return r.model.state_dict(), "resumed from" in capsys.readouterr().out

    first, resumed = run(cfg, encs[0])
    assert not resumed
    again, resumed = run(cfg, encs[0])
    assert resumed and same_weights(again, first)
    for k, (c, enc) in enumerate(((cfg.model_copy(update={"lr": 3e-4}), encs[0]), (cfg, encs[1]))):
        got, resumed = run(c, enc)
        assert not resumed and same_weights(got, run(c, enc, ck=f"fresh{k}")[0])
    dirs = list((tmp_path / "ck").iterdir())
    assert len(dirs) == 3 and all(ckpt.find_latest(d) is not None for d in dirs)


# ---------------------------------------------------------------------------------------------- stage


def test_stage_through_the_cli_on_the_synth_layout(tmp_path):
    """`localmim detect` on the generator's COCO layout: metrics equal pycocotools on the written results file,
    the saved model rebuilds from model.json and reproduces a detection, picture and data report written."""
    import yaml
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = synth_coco(tmp_path / "coco", train=6, val=3)
    enc = micro_encoder(tmp_path / "enc")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["detect"] |= {"epochs": 1, "num_workers": 0, "image_size": 32}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"detect": params["detect"]}))
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    p = run_cli("detect", "--encoder", str(enc), "--data", str(root), "--out", str(out), "--ckpt-dir",
                str(tmp_path / "ck"), "--metrics", str(metrics), "--params", str(tmp_path / "params.yaml"),
                cwd=tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(metrics.read_text())
    assert m["train_images"] == 6 and m["val_images"] == 3 and m["epochs"] == 1 and "train_images_per_s" not in m
    assert json.loads((tmp_path / "metrics.timing.json").read_text())["train_images_per_s"] > 0
    results = json.loads((out / "detections_val.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    for t in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(str(out / "detections_val.json")), t)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert [m[f"{t}_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == list(ev.stats[:6])
    from localmim.data.dense.coco import load_coco
    from localmim.eval.detection import prior_results

    prior = prior_results(load_coco(root, "train").coco, gt)  # the chance level the report shows next to AP
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "prior.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert {r["image_id"] for r in prior} == set(gt.imgs) and m["bbox_AP50_prior"] == ev.stats[1]
    from localmim.models.artifact import load_model

    model, spec = load_model(out, task="detect")
    card = json.loads((out / "model.json").read_text())
    assert spec.image_size == 32 and card["info"]["label_to_category"] == {str(k): v for k, v in
                                                                           load_coco(root, "val").label_to_cat.items()}
    from localmim.data.dense.coco import coco_dataset, collate
    from localmim.data.dense.coco_transforms import eval_transforms
    from localmim.eval.detection import to_coco_results

    val = load_coco(root, "val")
    images, targets = collate(list(coco_dataset(val, eval_transforms(val))))  # one batch, as the stage ran it
    with torch.no_grad():
        outputs = model.eval()(images)
    again = [r for t, o in zip(targets, outputs, strict=True) for r in to_coco_results(t["image_id"], o,
                                                                                     val.label_to_cat)]
    assert again == results
    assert (out / "val_predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["images_used"] == 6 and report["val"]["skipped"] == []


@pytest.mark.parametrize("preset", ["coco_vit_base.yaml", "coco_swin_base.yaml"])
def test_coco_presets_validate_and_build_the_detector(preset):
    """The published recipe each preset names, and the detector it builds (ViT-B/16 or Swin-B, on meta)."""
    import yaml

    from localmim.config.detect import DetectConfig

    tree = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / preset).read_text())
    cfg = DetectConfig(**tree["detect"])
    vit = "vit" in preset
    assert (cfg.image_size, cfg.augment, cfg.epochs) == ((1024, "lsj", 100) if vit else (800, "multiscale", 36))
    assert cfg.global_batch == cfg.batch_size * cfg.nproc_per_node == (64 if vit else 16)
    assert cfg.layer_decay == (0.7 if vit else 1.0)
    enc = (EncoderSpec("vit_base_patch16_224", {"img_size": 224, "patch_size": 16}, {}) if vit else
           EncoderSpec("swin_base_patch4_window7_224", {"img_size": 224}, {}))
    with torch.device("meta"):
        model = build_mask_rcnn(enc, DetectorSpec.from_config(cfg, num_classes=80), pretrained=False)
    blocks = model.backbone.body.encoder.blocks if vit else []
    assert [type(b).__name__ == "WindowedBlock" for b in blocks] == [i not in (2, 5, 8, 11) for i in range(len(blocks))]
    assert model.transform.min_size[-1] == cfg.image_size and model.transform.max_size == (cfg.max_size or 1024)
    assert model.backbone.out_channels == 256


@pytest.mark.slow
def test_stage_under_torchrun_two_ranks(tmp_path):
    """2 CPU processes (gloo): each rank predicts its share of the val images, rank 0 scores all of them; the
    written results cover every val image and re-score to the reported metrics."""
    import yaml
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = synth_coco(tmp_path / "coco", train=4, val=3)
    enc = micro_encoder(tmp_path / "enc")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["detect"]
    # global batch 4: 2 ranks x 2 micro-batches of 1
    params |= {"epochs": 1, "num_workers": 0, "image_size": 32, "global_batch": 4, "batch_size": 1, "device": "cpu"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"detect": params}))
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "localmim.cli",
           "detect", "--encoder", str(enc), "--data", str(root), "--out", str(out), "--ckpt-dir", str(tmp_path / "ck"),
           "--metrics", str(metrics), "--params", str(tmp_path / "params.yaml")]
    p = subprocess.run(cmd, cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(metrics.read_text())
    results = json.loads((out / "detections_val.json").read_text())
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    assert {r["image_id"] for r in results} == set(gt.imgs)
    ev = COCOeval(gt, gt.loadRes(str(out / "detections_val.json")), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert m["segm_AP"] == ev.stats[0] and m["val_images"] == 3

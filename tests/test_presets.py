"""The whole-reproduction presets (configs/*_full.yaml) and ``localmim plan``.

The presets are checked against the recipe tables of docs/method.md (§7 pretraining, §8 fine-tuning), written out
here by hand, and against the per-stage presets they gather; the plan's pretraining GPU-hours against the
reference's own total (method §7: GPU-hours per epoch x epochs).
"""

from __future__ import annotations

import pytest
import yaml

from localmim.config import all_sections, validate_all
from tests.conftest import ROOT, run_cli

FULL = {"vit_base": ("imagenet_vit_base", "ade20k_vit_base", "coco_vit_base"),
        "swin_base": ("imagenet_swin_base", "ade20k_swin_base", "coco_swin_base")}
# method §7 / §8 tables: effective batch, peak lr, epochs, warm-up, lr_min, layer decay, drop path
PRETRAIN = {"vit_base": dict(epochs=1600, warmup_epochs=40, batch=2048, lr=1.6e-3, min_lr=1e-6, hog_nbins=9,
                             hog_bias=False),
            "swin_base": dict(epochs=400, warmup_epochs=40, batch=2048, lr=8e-4, min_lr=0.0, hog_nbins=18,
                              hog_bias=True)}  # fmt: skip
FINETUNE = {"vit_base": dict(epochs=100, warmup_epochs=20, batch=1024, lr=2e-3, min_lr=1e-5, layer_decay=0.65,
                             drop_path=0.1),
            "swin_base": dict(epochs=100, warmup_epochs=20, batch=2048, lr=4e-3, min_lr=2.5e-7, layer_decay=0.9,
                              drop_path=0.1)}  # fmt: skip
GPU_HOURS_PER_EPOCH = {"vit_base": 0.7, "swin_base": 1.1}  # method §7, the reference README
# method §9.1 (both backbones: 2 per GPU x 8) and §9.2 (ViTDet: 64; Swin's Mask R-CNN 3x: 16): the global batches
DENSE = {"vit_base": dict(segment=16, detect=64), "swin_base": dict(segment=16, detect=16)}


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("backbone", FULL)
def test_full_preset_is_complete_and_follows_the_recipe(backbone):
    tree = _load(f"{backbone}_full")
    sections = all_sections()
    assert set(tree) == set(sections)  # a complete params file: every section, so it can replace params.yaml
    for name, section in tree.items():
        if name != "cluster":  # every key listed: nothing leaks in from params.yaml under --configfile
            assert set(section) == set(sections[name].model_fields), name
    cfg = validate_all(tree)
    p, f = cfg["pretrain"], cfg["finetune"]
    want = PRETRAIN[backbone]
    assert p.global_batch == want["batch"]
    assert p.accum_for(p.nproc_per_node) * p.batch_size * p.nproc_per_node == want["batch"]
    assert p.blr * want["batch"] / 256 == pytest.approx(want["lr"])
    assert (p.epochs, p.warmup_epochs, p.min_lr, p.hog_nbins, p.hog_bias, p.data, p.input_size) == (
        want["epochs"], want["warmup_epochs"], want["min_lr"], want["hog_nbins"], want["hog_bias"], "online", 224)
    want = FINETUNE[backbone]
    assert f.global_batch == want["batch"]
    assert f.accum_for(f.nproc_per_node) * f.batch_size * f.nproc_per_node == want["batch"]
    assert (f.epochs, f.warmup_epochs, f.lr, f.min_lr, f.layer_decay, f.drop_path) == (
        want["epochs"], want["warmup_epochs"], want["lr"], want["min_lr"], want["layer_decay"], want["drop_path"])
    assert (f.mixup, f.cutmix, f.smoothing, f.reprob, f.aa) == (0.8, 1.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1")
    for stage, batch in DENSE[backbone].items():
        d = cfg[stage]
        assert d.global_batch == d.accum_for(d.nproc_per_node) * d.batch_size * d.nproc_per_node == batch, stage
    assert all(cfg["datasets"].path_of(n) == "" for n in ("imagenet", "ade20k", "coco"))  # given at run time


@pytest.mark.parametrize("backbone", FULL)
def test_full_preset_gathers_the_per_stage_presets(backbone):
    tree = _load(f"{backbone}_full")
    for preset in FULL[backbone]:
        for name, section in _load(preset).items():
            for key, value in section.items():
                if not key.startswith("knn_"):
                    assert tree[name][key] == value, f"{preset}: {name}.{key}"


@pytest.mark.parametrize("backbone", FULL)
def test_plan_reproduces_the_references_pretraining_gpu_hours(backbone, tmp_path):
    from localmim.pipeline.plan import plan

    tree = {k: v.to_dict() for k, v in validate_all(_load(f"{backbone}_full")).items()}
    tree["datasets"].update(imagenet="/datasets/imagenet", ade20k="/datasets/ade", coco="/datasets/coco")
    works, sizes = plan(tree, tmp_path, {})
    assert sizes["imagenet"][:2] == (1_281_167, 50_000) and sizes["coco"][:2] == (118_287, 5_000)
    pre = next(w for w in works if w.stage == "pretrain")
    reference = GPU_HOURS_PER_EPOCH[backbone] * tree["pretrain"]["epochs"]
    assert pre.hours == pytest.approx(reference, rel=5e-3) and pre.devices == 8  # + the kNN monitor, - drop-last
    ft = next(w for w in works if w.stage == "finetune")
    assert ft.images == 100 * (1_281_167 + 50_000)


def test_plan_command_names_its_sources_and_reads_manifests(tmp_path):
    import json

    raw = tmp_path / "raw"
    raw.mkdir()
    man = {"root": "/data/in", "splits": {"train": {"num_images": 5000}, "val": {"num_images": 500}}}
    (raw / "imagenet.json").write_text(json.dumps(man))
    p = run_cli("plan", "--params", str(ROOT / "configs/vit_base_full.yaml"), "--raw", str(raw), "--set",
                "datasets.imagenet=/data/in", "--ips", "detect=5", check=True)  # fmt: skip
    assert "imagenet 5,000 train / 500 val (manifest" in p.stdout
    assert "method §7: the reference's 0.7 GPU-hours per ImageNet epoch" in p.stdout
    assert "--ips (given)" in p.stdout and "assumption" in p.stdout
    bad = run_cli("plan", "--ips", "pretrain=fast")
    assert bad.returncode == 2 and "--ips 'pretrain=fast'" in bad.stderr

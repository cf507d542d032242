"""``localmim plan`` for the cluster the user has: per-device batch, accumulation, memory estimate, chained jobs.

The ViT-B preset (configs/vit_base_full.yaml) on 1 x 8 and 4 x 8 GPUs of 80 GiB with a 24 h limit, checked against a
hand computation from docs/method.md's figures written out below: §7's 0.7 GPU-hours per ImageNet epoch, 1600
epochs, global batch 2048, and 256 images per V100-32GB (the memory calibration); §8's 1024 / 128 per GPU; §9's global
batches (segment 16, 2 crops of 512 px per V100-32GB; detect 64, no memory figure).
"""

from __future__ import annotations

import math

import pytest
import yaml

from localmim.config import validate_all
from localmim.pipeline.cluster_plan import Cluster, PlanError, parse_time_limit
from tests.conftest import ROOT

N_TRAIN, N_VAL = 1_281_167, 50_000  # ImageNet-1K, the official sizes
RESTART_H = 5 / 60  # the plan's default restart cost per job


def _tree() -> dict:
    tree = yaml.safe_load((ROOT / "configs" / "vit_base_full.yaml").read_text())
    tree = {k: v.to_dict() for k, v in validate_all(tree).items()}
    tree["datasets"].update(imagenet="/datasets/imagenet", ade20k="/datasets/ade", coco="/datasets/coco")
    return tree


def _stages(cluster: Cluster, tmp_path) -> dict:
    from localmim.pipeline.plan import plan

    works, _ = plan(_tree(), tmp_path, {}, cluster)
    return {w.stage: w for w in works}


# Hand computation, pretraining (method §7): 1600 epochs of floor(N / 2048) steps of 2048 images at 0.7 V100-hours
# per N images, plus the preset's kNN monitor (every 20 epochs: 20,000 bank + 5,000 query images, forward only, at
# DeiT's 292 images/s, the plan's stated inference rate).
PRE_IMAGES = 1600 * (N_TRAIN // 2048) * 2048 + (1600 // 20) * (20_000 + 5_000)
PRE_GPU_H = 1600 * (N_TRAIN // 2048) * 2048 / N_TRAIN * 0.7 + 80 * 25_000 / 292 / 3600


def _jobs_by_hand(wall: float, ckpt: float, limit: float) -> tuple[int, float]:
    """Every job restarts (5 min); every job the limit cuts loses one checkpoint interval; the last is not cut."""
    n = 1 + math.ceil((wall - (limit - RESTART_H)) / (limit - RESTART_H - ckpt))
    return n, wall + n * RESTART_H + (n - 1) * ckpt


@pytest.mark.parametrize("nodes, want_batch, want_jobs", [(1, 256, 6), (4, 64, 2)])
def test_vit_base_pretraining_on_8_and_32_gpus_of_80_gib(nodes, want_batch, want_jobs, tmp_path):
    pre = _stages(Cluster(nodes=nodes, gpus_per_node=8, gpu_mem=80, time_limit_h=24), tmp_path)["pretrain"]
    gpus = 8 * nodes
    # 256 images fit 32 GiB (method §7), so 640 fit 80 GiB: 2048 / gpus per GPU fits, no accumulation
    assert 2048 // gpus <= 256 * 80 // 32 and want_batch == 2048 // gpus
    assert (pre.devices, pre.run.batch, pre.run.accum, pre.run.global_batch) == (gpus, want_batch, 1, 2048)
    assert pre.run.mem_gib == pytest.approx(want_batch * 32 / 256)
    assert pre.images == PRE_IMAGES and pre.hours == pytest.approx(PRE_GPU_H, rel=1e-3)
    assert abs(pre.hours - 1120) / 1120 < 2e-3  # method §7's total: the GPU-hours do not depend on the cluster
    wall = PRE_GPU_H / gpus
    ckpt = min(wall / 1600, 30 / 60)  # a checkpoint every epoch, and every 30 min within one (the preset)
    n, total = _jobs_by_hand(wall, ckpt, 24)
    assert (pre.run.jobs, n) == (want_jobs, want_jobs)  # 140.1 h on 8 GPUs: 6 jobs; 35.0 h on 32: 2
    assert pre.run.wall_h == pytest.approx(total, rel=1e-3)


def test_vit_base_finetuning_and_the_dense_stages_on_one_of_four_nodes(tmp_path):
    """Only pretraining spans nodes (pretrain.nnodes); fine-tuning, segmentation and detection are one-node rules."""
    st = _stages(Cluster(nodes=4, gpus_per_node=8, gpu_mem=80, time_limit_h=24), tmp_path)
    ft = st["finetune"]  # method §8: global 1024; 128 per GPU fit 32 GiB, so 320 fit 80; 8 GPUs: 128 each
    assert (ft.devices, ft.run.batch, ft.run.accum, ft.run.global_batch) == (8, 1024 // 8, 1, 1024)
    ft_h = (100 * N_TRAIN / (292 / 3) + 100 * N_VAL / 292) / 3600  # the plan's stated rates: 1/3 of DeiT's, DeiT's
    assert ft.hours == pytest.approx(ft_h, rel=1e-3)
    seg, det = st["segment"], st["detect"]  # global batches 16 and 64 on one node's 8 GPUs: 2 and 8 each
    assert (seg.devices, seg.run.batch, seg.run.accum, seg.run.global_batch, seg.run.mem_gib) == (8, 2, 1, 16, 32.0)
    assert seg.images == 160_000 * 16 + 10 * 2_000  # 160k iterations of 16 crops + an evaluation every 16k
    assert (det.devices, det.run.batch, det.run.accum, det.run.global_batch, det.run.mem_gib) == (8, 8, 1, 64, None)
    assert det.images == 100 * (118_287 // 64) * 64 + 10 * 5_000  # whole global batches + an evaluation every 10
    assert (st["linprobe"].devices, st["linprobe"].run.accum) == (1, 16384 // 16384)


def test_less_memory_means_accumulation_and_the_restarts_can_add_a_job(tmp_path):
    pre = _stages(Cluster(gpus_per_node=8, gpu_mem=16, time_limit_h=23.5), tmp_path)["pretrain"]
    # 16 GiB hold 256 * 16 / 32 = 128 images: 2048 = 128 x 2 x 8
    assert (pre.run.batch, pre.run.accum) == (128, 2)
    seg = _stages(Cluster(gpus_per_node=8, gpu_mem=16, time_limit_h=23.5), tmp_path)["segment"]
    assert (seg.devices, seg.run.batch, seg.run.accum) == (8, 1, 2)  # 1 crop of 512 px per 16 GiB: 16 = 1 x 2 x 8
    wall = PRE_GPU_H / 8
    assert math.ceil(wall / 23.5) == 6  # 140.1 / 23.5 = 5.96 jobs without the overhead ...
    assert pre.run.jobs == _jobs_by_hand(wall, wall / 1600, 23.5)[0] == 7  # ... 7 (6 without restarts or lost epochs)


def test_defaults_are_the_params_own_gpus_and_time_limits(tmp_path):
    st = _stages(Cluster(), tmp_path)  # 8 GPUs per training stage (nproc_per_node), 32 GiB, cluster runtimes
    pre = st["pretrain"]
    assert (pre.devices, pre.run.batch, pre.run.accum, pre.run.limit_h) == (8, 256, 1, 4320 / 60)
    assert pre.run.jobs == 2  # 140.1 h in 72 h jobs (the preset's cluster.rules.pretrain.runtime)
    assert [(st[s].devices, st[s].run.batch, st[s].run.accum) for s in ("segment", "detect")] == [(8, 2, 1), (8, 8, 1)]
    assert st["linprobe"].run.limit_h == 720 / 60 and st["linprobe"].run.jobs == 1


def test_time_limits():
    assert [parse_time_limit(t) for t in ("24h", "90m", "2d", "1d12h", "72:00:00", "3-00:00:00", "4320", "1.5h")] == [
        24, 1.5, 48, 36, 72, 72, 72, 1.5]  # fmt: skip
    with pytest.raises(PlanError, match="--time-limit 'soon'"):
        parse_time_limit("soon")


def test_cli_plans_the_cluster_and_refuses_a_gpu_count_the_global_batch_does_not_divide(capsys):
    from localmim.cli import main

    preset = ["plan", "--params", str(ROOT / "configs" / "vit_base_full.yaml")]
    assert main([*preset, "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem", "80", "--time-limit", "24h"]) == 0
    out = capsys.readouterr().out
    row = next(ln.split() for ln in out.splitlines() if ln.startswith("pretrain "))
    assert row[2:7] == ["32", "64", "1", "2048", "8.0"]  # devices, batch/GPU, accum, global, GiB/GPU
    assert "--set pretrain.batch_size=64" in out and "method §7: 256 ViT-B/16 images per GPU" in out
    assert "--set pretrain.nnodes=4" in out and "the other training rules are one-node jobs" in out
    assert "segment.batch_size" not in out and "detect.batch_size" not in out  # one node: the presets' own 2 and 8
    assert "global batch 16 on" not in out and "! segment" not in out
    assert main([*preset, "--gpus-per-node", "1", "--gpu-mem", "16"]) == 0  # 1 crop fits 16 GiB: 1 x 16 accumulated
    assert "! segment: 1 crop on 1 GPU leaves UperNet's BatchNorm one value per channel" in capsys.readouterr().out
    assert main([*preset, "--nodes", "3", "--gpus-per-node", "8"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.global_batch=2048 is not a multiple of the 24 GPUs" in err and "16 or 32" in err
    assert main([*preset, "--gpus-per-node", "8", "--gpu-mem", "0.1"]) == 2
    assert "not even 1 image per GPU fits 0.1 GiB" in capsys.readouterr().err
    assert main([*preset, "--time-limit", "soon"]) == 2
    assert "--time-limit 'soon': expected e.g. 24h" in capsys.readouterr().err

"""The global batch of the dense stages (method §17 row 39): the samplers (``data/dense/samplers.py``) deal the same
global batches on any (world size, per-device batch), computed here from the seeded permutations written out; with one
rank and no accumulation they give what segment's and detect's samplers gave before (the old formulas written out
below); accumulation in the segment and detect loops steps like the global batch it splits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from localmim.data.dense.samplers import EpochBatches, StepBatches
from localmim.runtime.distributed import DistInfo
from localmim.runtime.precision import Precision
from localmim.train import loop
from localmim.train.engine import Engine

N, SEED, G = 23, 5, 8  # 23 items: 2 global batches of 8 per epoch, 7 left over
SPLITS = [(1, 8), (1, 4), (1, 1), (2, 4), (2, 2), (2, 1), (4, 2), (8, 1)]  # (world, batch_size): accumulation 1..8
CPU = torch.device("cpu")


def _perm(seed: int, n: int = N) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _steps(batches_of_ranks: list[list], accum: int, steps: int) -> list[list]:
    """Per optimizer step, every rank's micro-batches of it together, sorted."""
    return [sorted(x for mine in batches_of_ranks for b in mine[k * accum:(k + 1) * accum] for x in b)
            for k in range(steps)]


# ------------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("world,batch", SPLITS)
def test_segment_steps_hold_the_same_global_batch_and_seeds_on_any_world(world, batch):
    iters, accum = 7, G // (batch * world)  # 7 steps: epochs 0..3 of 2 steps each
    ranks = [list(StepBatches(N, batch, iters, SEED, r, world, global_batch=G)) for r in range(world)]
    assert all(len(mine) == iters * accum and all(len(b) == batch for b in mine) for mine in ranks)
    for step, got in enumerate(_steps(ranks, accum, iters)):
        epoch, k = divmod(step, N // G)
        perm = _perm(SEED * 1_000_003 + epoch)  # the epoch's permutation; the step is its k-th slice of G
        assert got == sorted((perm[k * G + p], (SEED * 1_000_003 + step) * G + p) for p in range(G))
    # resumed at step 3 (on this world): the rest of the uninterrupted run's micro-batches
    assert [list(StepBatches(N, batch, iters, SEED, r, world, 3, global_batch=G)) for r in range(world)] == [
        mine[3 * accum:] for mine in ranks]


def _old_step_batches(n: int, bs: int, iters: int, seed: int, rank: int, world: int):
    """segment's sampler before the global batch (each rank a strided share, seeds by rank)."""
    per_epoch = n // (bs * world)
    for step in range(iters):
        epoch, k = divmod(step, per_epoch)
        mine = _perm(seed * 1_000_003 + epoch, n)[rank::world]
        base = ((seed * 1_000_003 + step) * world + rank) * bs
        yield [(mine[k * bs + j], base + j) for j in range(bs)]


def test_segment_one_rank_without_accumulation_is_the_old_sampler():
    for bs in (1, 4, 8):
        old = list(_old_step_batches(N, bs, 12, SEED, 0, 1))
        assert list(StepBatches(N, bs, 12, SEED)) == list(StepBatches(N, bs, 12, SEED, global_batch=bs)) == old


@pytest.mark.parametrize("world,batch", SPLITS)
def test_detect_steps_hold_the_same_global_batch_on_any_world(world, batch):
    accum, steps = G // (batch * world), N // G
    for epoch in (0, 3):
        ranks = [list(EpochBatches(N, batch, SEED, epoch, r, world, global_batch=G)) for r in range(world)]
        assert all(len(mine) == steps * accum and all(len(b) == batch for b in mine) for mine in ranks)
        perm = _perm(SEED + epoch)  # DistributedSampler's: randperm seeded by seed + epoch
        assert _steps(ranks, accum, steps) == [sorted(perm[k * G:(k + 1) * G]) for k in range(steps)]
        # resumed mid-epoch at optimizer step 1: the rest of the uninterrupted epoch's micro-batches
        assert [list(EpochBatches(N, batch, SEED, epoch, r, world, 1, global_batch=G)) for r in range(world)] == [
            mine[accum:] for mine in ranks]


def test_detect_one_rank_without_accumulation_is_the_old_distributed_sampler():
    """detect before the global batch: ``DataLoader(batch_size=b, sampler=DistributedSampler(shuffle=True, seed))``
    per epoch; the new epoch is the same batches without the last partial one (23 = 5 x 4 + 3)."""
    from torch.utils.data import DataLoader, DistributedSampler

    for epoch in (0, 1, 4):
        old = DistributedSampler(range(N), num_replicas=1, rank=0, shuffle=True, seed=SEED)
        old.set_epoch(epoch)
        old_batches = [b.tolist() for b in DataLoader(range(N), batch_size=4, sampler=old)]
        assert [len(b) for b in old_batches] == [4] * 5 + [3]
        assert list(EpochBatches(N, 4, SEED, epoch)) == old_batches[:5]


def test_a_global_batch_that_does_not_divide_or_exceeds_the_data_is_refused():
    with pytest.raises(ValueError, match=r"global_batch=8 is not a multiple of batch_size=3 x world_size=2"):
        StepBatches(N, 3, 4, SEED, 0, 2, global_batch=8)
    with pytest.raises(ValueError, match=r"23 training images are fewer than the global batch of 24"):
        EpochBatches(N, 4, SEED, 0, 0, 2, global_batch=24)


def test_the_dense_sections_take_the_global_batch_mixin():
    from localmim.config import ParamsError, validate_section
    from localmim.config.detect import DetectConfig
    from localmim.config.segment import SegmentConfig

    for cls, lr in ((SegmentConfig, 4e-4), (DetectConfig, 1e-4)):
        cfg = cls(global_batch=16, batch_size=2, lr=lr)
        assert (cfg.accum_for(1), cfg.accum_for(8), cfg.peak_lr()) == (8, 1, lr)  # lr absolute: no blr rescaling
        with pytest.raises(ValueError, match=r"global_batch=16 is not a multiple of batch_size=2 x world_size=3"):
            cfg.accum_for(3)
        a, b = cfg.model_copy(update={"batch_size": 4, "nproc_per_node": 4}), cfg.model_copy(update={"global_batch": 8})
        assert a.run_key() == cfg.run_key() != b.run_key()  # the per-device batch is a runtime knob
        with pytest.raises(ParamsError, match=r"accum_iter: derived now"):
            validate_section("s", cls, {"accum_iter": 2})
        with pytest.raises(ParamsError, match=r"global_batch=16 is not a multiple of batch_size=2 x world_size=3"):
            validate_section("s", cls, {"global_batch": 16, "batch_size": 2, "nproc_per_node": 3})


# ------------------------------------------------------------------------------------ accumulation, segment


def test_segment_refuses_a_per_device_batch_its_batch_norm_cannot_take():
    """One crop per device: UperNet's 1x1 pyramid bin would give BatchNorm one value per channel (torch's cryptic
    error mid-run); refused before any work, unless SyncBatchNorm spans 2+ CUDA ranks."""
    from localmim.config.segment import SegmentConfig
    from localmim.train.segment import check_batch_norm, run_segment

    cfg = SegmentConfig(global_batch=4, batch_size=1, device="cpu")
    with pytest.raises(ValueError, match=r"segment.batch_size=1: UperNet's BatchNorm .* use batch_size >= 2"):
        run_segment(cfg, None, [], [], "unused", dist=DistInfo(0, 1, 0, CPU))
    check_batch_norm(cfg, DistInfo(0, 2, 0, torch.device("cuda")))  # SyncBatchNorm: 2 values per channel
    with pytest.raises(ValueError, match=r"batch_size >= 2"):
        check_batch_norm(cfg, DistInfo(0, 2, 0, CPU))  # gloo on CPU keeps plain BatchNorm


def _ade_all_labelled(root, n: int, size: int = 40) -> None:
    """An ADE20K layout whose every pixel is labelled (1..4, none ignored), so every 32-px crop of it counts the same
    pixels and the mean over a batch's pixels is the mean of its micro-batches' means."""
    rng = np.random.default_rng(0)
    base = root / "ADEChallengeData2016"
    for split, m in (("training", n), ("validation", 1)):
        for kind in ("images", "annotations"):
            (base / kind / split).mkdir(parents=True)
        for i in range(m):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                base / "images" / split / f"a{i}.jpg")
            Image.fromarray(rng.integers(1, 5, (size, size), dtype=np.uint8), "L").save(
                base / "annotations" / split / f"a{i}.png")


def _without_batch_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm (batch statistics: a micro-batch's differ from the big batch's) and dropout replaced by identities."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm | torch.nn.Dropout2d):
                setattr(mod, name, torch.nn.Identity())
    return model


def _sgd_engine(model: torch.nn.Module) -> Engine:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # plain SGD: an update is the step's gradient itself
    return Engine(model, model, opt, Precision.of("none", CPU), DistInfo(0, 1, 0, CPU))


def _constant_lr(eng: Engine, lr: float):
    def schedule(step: int, epoch: float) -> float:
        for g in eng.opt.param_groups:
            g["lr"] = lr
        return lr
    return schedule


def test_segment_accumulation_steps_like_one_big_batch(tmp_path):
    """Global batch 4: ``batch_size 2`` (2 micro-batches per step) makes the same two SGD steps as ``batch_size 4``,
    through the segment loop and its sampler (same crops, same augmentation seeds). UperNet's BatchNorm would not
    allow it (micro-batch statistics), so the heads run without it here; the rest is the stage's model."""
    from localmim.config.segment import SegmentConfig
    from localmim.data.dense.ade20k import scan_split
    from localmim.models.segmentation import SegmenterSpec, build_segmenter
    from localmim.train.segment import SegmentMethod
    from tests.encoders import micro_spec

    _ade_all_labelled(tmp_path / "ade", 8)
    tr, va = (scan_split(tmp_path / "ade", s, 4).pairs for s in ("train", "val"))

    def train(batch: int) -> dict[str, torch.Tensor]:
        cfg = SegmentConfig(num_classes=4, crop_size=32, scale=[64, 32], ratio_range=[1.0, 1.0], cat_max_ratio=1.0,
                            test_scale=[64, 32], channels=16, aux_channels=8, drop_path=0.0, iters=2, warmup_iters=0,
                            global_batch=4, batch_size=batch, num_workers=0, slide_stride=24, device="cpu")
        torch.manual_seed(0)
        model = _without_batch_statistics(build_segmenter(micro_spec(), SegmenterSpec.from_config(cfg)))
        init = {k: v.clone() for k, v in model.state_dict().items()}
        eng = _sgd_engine(model)
        plan = loop.Plan("segment", 1, 2, ("loss", "loss_decode", "loss_aux"), cfg.accum_for(1),
                         loop.Cadence("step", eval_every=0, ckpt_every=0), eval_at_end=False, progress=False)
        loop.run(SegmentMethod(cfg, eng, tr, va, None), eng, _constant_lr(eng, 0.5), plan)
        return {k: v - init[k] for k, v in model.state_dict().items()}

    small, big = train(2), train(4)
    assert small["decode_head.cls.weight"].abs().max() > 1e-2
    assert small["backbone.encoder.blocks.0.attn.qkv.weight"].abs().max() > 1e-5
    for k in small:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------- accumulation, detect


def test_detect_accumulation_averages_the_micro_batch_gradients(tmp_path):
    """Global batch 2 at ``batch_size 1``: two SGD steps of the detect loop equal, computed here with autograd, the
    updates by the mean gradient of each step's two images, taken in the epoch's permutation order (seed + epoch).
    Mask R-CNN's RPN and RoI sampling (and each micro-batch's own loss normalisation) make a micro-batch differ from a
    big batch, so the big batch is not the reference here: the averaging is (with the same random draws, in order)."""
    from localmim.config.detect import DetectConfig
    from localmim.data.dense.coco import coco_dataset, collate, load_coco
    from localmim.data.dense.coco_transforms import train_transforms
    from localmim.models.detection import DetectorSpec, build_mask_rcnn
    from localmim.train.detect import DetectMethod
    from tests.coco_data import synth_coco
    from tests.encoders import micro_spec

    root = synth_coco(tmp_path / "coco", train=5, val=1)
    split = load_coco(root, "train", train=True)
    cfg = DetectConfig(image_size=32, scale_range=[0.5, 1.5], epochs=1, global_batch=2, batch_size=1, drop_path=0.0,
                       box_head_dim=32, mask_head_channels=8, rpn_batch_size_per_image=32, box_batch_size_per_image=16,
                       num_workers=0, device="cpu", seed=3)
    torch.manual_seed(0)
    model = build_mask_rcnn(micro_spec(), DetectorSpec.from_config(cfg, num_classes=len(split.cat_ids)))
    ref = copy.deepcopy(model)  # the initial weights, trained below by hand
    head0 = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    data = coco_dataset(split, train_transforms(split, cfg.augment, cfg.image_size, cfg.scale_range), train=True)

    eng = _sgd_engine(model)
    plan = loop.Plan("detect", 1, 2, ("loss", "a", "b", "c", "d", "e"), cfg.accum_for(1),
                     loop.Cadence(eval_every=0, ckpt_every=0), eval_at_end=False, progress=False)
    torch.manual_seed(11)  # augmentation (num_workers = 0) and the RPN / RoI sampling draw from here
    loop.run(DetectMethod(cfg, eng, data, None, None, {}), eng, _constant_lr(eng, 0.1), plan)

    torch.manual_seed(11)  # the same draws, in the same order: image, its forward, the next image, ...
    ref.train()
    perm = _perm(cfg.seed + 0, 5)  # epoch 0's permutation (DistributedSampler's); step k: positions 2k, 2k + 1
    params = [p for p in ref.parameters() if p.requires_grad]
    for step in range(2):
        mean = [torch.zeros_like(p) for p in params]
        for m in range(2):
            images, targets = collate([data[perm[step * 2 + m]]])
            grads = torch.autograd.grad(sum(ref(images, targets).values()), params, allow_unused=True)
            mean = [a + (g / 2 if g is not None else 0) for a, g in zip(mean, grads, strict=True)]
        with torch.no_grad():
            for p, g in zip(params, mean, strict=True):
                p -= 0.1 * g
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert (got["roi_heads.box_predictor.cls_score.weight"] - head0).abs().max() > 1e-3
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)

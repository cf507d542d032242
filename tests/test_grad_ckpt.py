"""Activation (gradient) checkpointing, ``grad_checkpointing`` of pretrain / finetune / segment / detect (issue 30).

For every model family the four stages build, the gradients with checkpointing equal those of the same model
without it (fp32, relative error <= 1e-6 per parameter), with drop path > 0, so the recomputation must redraw the
same stochastic-depth masks (``torch.utils.checkpoint`` restores the RNG state); the masking noise and the RPN /
ROI sampling are drawn outside the blocks. That the recomputation happened is checked independently: every
transformer block's MLP runs twice per step with checkpointing (forward + backward recomputation), once without.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

from localmim.models import create
from localmim.models.common import set_grad_checkpointing
from tests.encoders import MICRO, micro_spec

SIZE = {"vit": 32, "swin": 64}  # the micro encoders' pre-training resolutions (tests/encoders.py)
DROP = 0.25


def _step(model: torch.nn.Module, loss_fn, seed: int = 0) -> tuple[dict[str, torch.Tensor], Counter]:
    """One forward + backward from ``seed``: the parameter gradients and how often each block MLP ran."""
    calls: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.update([name]))
             for name, m in model.named_modules() if isinstance(m, Mlp)]  # pre-hook: recomputation may stop inside
    torch.manual_seed(seed)
    try:
        loss_fn(model).backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, calls


def _assert_same_gradients(plain: torch.nn.Module, loss_fn) -> None:
    """``plain`` vs a copy with checkpointing on: same gradients, every block recomputed once."""
    ckpt = copy.deepcopy(plain)
    assert set_grad_checkpointing(ckpt, True)
    want, runs = _step(plain, loss_fn)
    got, reruns = _step(ckpt, loss_fn)
    assert runs and set(runs.values()) == {1}  # each block MLP once per step without checkpointing
    assert reruns == Counter({k: 2 * v for k, v in runs.items()})  # ... and recomputed in the backward with it
    assert want and want.keys() == got.keys()
    assert sum(bool(g.any()) for g in want.values()) > 0.5 * len(want)  # not a vacuous comparison of zeros
    for name, g in want.items():
        rel = ((got[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-6, f"{name}: relative gradient error {rel:.2e}"


def _with_drop_path(model: torch.nn.Module, p: float = DROP) -> torch.nn.Module:
    """Stochastic depth in every timm block of ``model`` (the pre-training models are built with none)."""
    for m in model.modules():
        if hasattr(m, "drop_path1") and hasattr(m, "mlp"):
            m.drop_path1, m.drop_path2 = DropPath(p), DropPath(p)
    return model


def _images(family: str, batch: int = 2) -> torch.Tensor:
    s = SIZE[family]
    return torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_pretrain_model_gradients_equal_the_unchecked_model(family):
    """The masked encoder and the per-tap decoders (method §2, §3), drop path in every encoder/decoder block;
    the mask is drawn per forward from the global RNG, outside the blocks."""
    name, kwargs = MICRO[family]
    torch.manual_seed(0)
    model = _with_drop_path(create(name, **kwargs)).train()
    images = _images(family)
    _assert_same_gradients(model, lambda m: m(images, mask_ratio=0.5)[0])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_finetune_classifier_gradients_equal_the_unchecked_model(family):
    """The timm classifier of ``finetune`` (timm's own ``set_grad_checkpointing``), drop path 0.25."""
    from localmim.models.encoder_io import build_classifier

    torch.manual_seed(0)
    model = build_classifier(micro_spec(family), 5, drop_path=DROP).train()
    x = torch.randn(4, 3, SIZE[family], SIZE[family])
    y = torch.tensor([0, 1, 2, 3])
    _assert_same_gradients(model, lambda m: F.cross_entropy(m(x), y))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_segmenter_gradients_equal_the_unchecked_model(family):
    """UperNet on the dense backbone (``forward_intermediates`` of timm's ViT / Swin), drop path, dropout heads."""
    from localmim.models.segmentation import SegmenterSpec, build_segmenter

    s = SIZE[family]
    torch.manual_seed(0)
    spec = SegmenterSpec(num_classes=4, crop_size=s, channels=16, aux_channels=8, drop_path=DROP)
    model = build_segmenter(micro_spec(family), spec).train()
    images = _images(family)
    labels = torch.randint(0, 4, (2, s, s), generator=torch.Generator().manual_seed(2))

    def loss(m):
        logits, aux = m(images)
        return F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(aux, labels)

    _assert_same_gradients(model, loss)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mask_rcnn_gradients_equal_the_unchecked_model(family):
    """Mask R-CNN on the dense backbone; ViT with ViTDet windowed blocks (4x4-patch windows, blocks 1 and 3
    global); the RPN / ROI sampling draws from the global RNG outside the backbone."""
    from localmim.models.detection import DetectorSpec, build_mask_rcnn

    win = dict(window_size=4, global_blocks=[1, 3]) if family == "vit" else {}
    torch.manual_seed(0)
    spec = DetectorSpec(num_classes=2, image_size=64, drop_path=DROP, box_head_dim=32, mask_head_channels=8,
                        rpn_batch_size_per_image=32, box_batch_size_per_image=32, **win)
    model = build_mask_rcnn(micro_spec(family), spec).train()
    images = list(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:30] = masks[1, 30:60, 20:50] = 1
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks[:1]},
               {"boxes": torch.tensor([[20.0, 30.0, 50.0, 60.0]]), "labels": torch.tensor([2]), "masks": masks[1:]}]
    _assert_same_gradients(model, lambda m: sum(m(images, targets).values()))


def test_switching_off_and_models_without_support():
    """Off again restores one run per block; a model with nothing to checkpoint is refused when asked to."""
    name, kwargs = MICRO["vit"]
    torch.manual_seed(0)
    model = create(name, **kwargs)
    images = _images("vit")
    assert set_grad_checkpointing(model, True) == [""]
    assert set_grad_checkpointing(model, False) == [""]
    _, runs = _step(model, lambda m: m(images)[0])
    assert set(runs.values()) == {1}
    with pytest.raises(ValueError, match="no part that supports gradient checkpointing"):
        set_grad_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), True)
    assert set_grad_checkpointing(torch.nn.Linear(2, 2), False) == []


def test_the_param_is_a_runtime_key_of_the_four_stages():
    """A resumed run may toggle it: it does not change what is computed, so it stays out of the run's identity."""
    from localmim.config.detect import DetectConfig
    from localmim.config.finetune import FinetuneConfig
    from localmim.config.pretrain import PretrainConfig
    from localmim.config.segment import SegmentConfig

    for section in (PretrainConfig, FinetuneConfig, SegmentConfig, DetectConfig):
        off, on = section(), section(grad_checkpointing=True)
        assert off.grad_checkpointing is False and off.run_key() == on.run_key(), section.__name__


def test_pretrain_run_recomputes_its_blocks_and_trains_the_same(tmp_path):
    """``pretrain.grad_checkpointing`` reaches the model ``build_engine`` builds: its blocks run twice per step, and
    two AdamW steps through the training loop end at the same weights as without."""
    from localmim.config.pretrain import PretrainConfig
    from localmim.runtime.distributed import DistInfo
    from localmim.train import loop
    from localmim.train.pretrain import PretrainMethod, build_engine, plan_of
    from localmim.train.schedule import WarmupCosine
    from tests.pretrain_helpers import FixedBatches

    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    weights, calls = {}, {}
    for on in (False, True):
        cfg = PretrainConfig(model=MICRO["vit"][0], input_size=32, global_batch=4, batch_size=4, epochs=1,
                             warmup_epochs=0, lr=1e-3, min_lr=1e-3, ckpt_minutes=0, grad_checkpointing=on)
        eng = build_engine(cfg, dist)
        count: Counter = Counter()
        for m in eng.model.modules():
            if isinstance(m, Mlp):
                m.register_forward_pre_hook(lambda mod, args, count=count: count.update(["mlp"]))
        plan = plan_of(cfg, 2, 1, eng.model.loss_names, progress=False)
        schedule = WarmupCosine(eng.opt, cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        loop.run(PretrainMethod(cfg, eng, FixedBatches([imgs[:4], imgs[4:]])), eng, schedule, plan)
        weights[on], calls[on] = eng.model.state_dict(), count["mlp"]
    assert calls[False] == 2 * (4 + 4) and calls[True] == 2 * calls[False]  # 2 steps x (4 encoder + 4 decoder blocks)
    for k, w in weights[False].items():
        torch.testing.assert_close(weights[True][k], w, rtol=1e-6, atol=1e-7, msg=k)

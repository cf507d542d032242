"""The training engine (train/engine.py): the non-finite-loss guard, the checkpoint identity rule, the encoder
fingerprint, precision on CPU, and timm's cosine schedule against the method §7 formula."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from localmim.config.segment import SegmentConfig
from localmim.models.encoder_io import EncoderSpec
from localmim.runtime.distributed import DistInfo
from localmim.runtime.precision import Precision
from localmim.train.engine import Checkpoints, Engine, LossMeter, NonFiniteLossError, encoder_fingerprint
from localmim.train.schedule import WarmupCosine

CPU = torch.device("cpu")
ONE = DistInfo(0, 1, 0, CPU)


def test_loss_meter_means_and_the_first_non_finite_step():
    ckpts = Checkpoints("ck", {"stage": "segment"}, {})
    ckpts.last = Path("ck/run/ckpt-000000004.pt")
    m = LossMeter("segment", ["a", "b"], CPU, ckpts)
    vals = [(1.0, 2.0), (3.0, 5.0), (0.5, 0.25)]
    for step, (a, b) in enumerate(vals):
        m.add([torch.tensor(a), torch.tensor(b)], step, images=2)
    out = m.read(1)
    assert (out["a"], out["b"]) == (np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals]))
    assert m.n == 0 and out["images_per_s"] > 0  # a fresh interval
    m.add([torch.tensor(1.0), torch.tensor(1.0)], 5)
    m.add([torch.tensor(float("nan")), torch.tensor(1.0)], 6)  # the first bad step
    m.add([torch.tensor(1.0), torch.tensor(float("inf"))], 7)
    with pytest.raises(NonFiniteLossError, match=r"^segment: non-finite loss at step 6 \(epoch 2\).*ckpt-000000004"):
        m.read(1, epoch=2)


def _engine(out_features: int = 2) -> Engine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, out_features)
    return Engine(model, model, torch.optim.AdamW(model.parameters(), lr=1e-2), Precision.of("auto", CPU), ONE)


def test_a_checkpoint_resumes_only_its_own_run(tmp_path):
    cfg = SegmentConfig(iters=10, warmup_iters=0)
    enc = EncoderSpec("vit_x", {"img_size": 32}, {"w": torch.ones(2)})

    def of(c, world: int = 1, e: EncoderSpec = enc, data: str = "d0") -> Checkpoints:
        return Checkpoints.of(tmp_path, "segment", c, DistInfo(0, world, 0, CPU), encoder=encoder_fingerprint(e),
                              data=data)

    base = of(cfg)
    assert of(cfg.model_copy(update={"num_workers": 0, "log_every": 1})).dir == base.dir  # runtime knobs
    # the global batch is the recipe: another world size or per-device batch continues the same run
    assert of(cfg.model_copy(update={"batch_size": 4}), world=2).dir == base.dir
    for other in (of(cfg.model_copy(update={"lr": 1e-3})), of(cfg.model_copy(update={"global_batch": 8})),
                  of(cfg, data="d1"),
                  of(cfg, e=EncoderSpec("vit_x", {"img_size": 32}, {"w": torch.full((2,), 1.0 + 2**-23)}))):
        assert other.dir != base.dir
    from localmim.config.base import Section
    from localmim.train.engine import run_identity

    class PerDevice(Section):  # a section with only a per-device batch: the world size changes what it computes
        batch_size: int = 2

    assert run_identity("x", PerDevice(), 1) != run_identity("x", PerDevice(), 2)
    eng = _engine()
    eng.step(lambda: eng.net(torch.ones(4, 3)).square().mean())  # one AdamW step: state to restore
    saved = base.save(eng, epoch=0, step=1, batches=1, extra={"history": [1]})
    fresh = _engine()
    payload = of(cfg).resume(fresh)
    assert payload["extra"] == {"history": [1]} and payload["params"] == cfg.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(eng.model.state_dict().values(), fresh.model.state_dict().values(),
                                                 strict=True))
    assert of(cfg.model_copy(update={"lr": 1e-3})).resume(_engine()) is None  # another run: nothing to resume
    stray = of(cfg, data="d1")  # a checkpoint copied into another run's directory is refused, not loaded
    stray.dir.mkdir(parents=True)
    (stray.dir / saved.name).write_bytes(saved.read_bytes())
    with pytest.raises(ValueError, match=f"{saved.name}: made for another run.*remove {stray.dir}"):
        stray.resume(_engine())
    with pytest.raises(ValueError, match=f"{saved.name}: does not fit the model built now"):
        of(cfg).resume(_engine(out_features=5))


def test_encoder_fingerprint_sees_every_weight_bit_and_the_architecture():
    sd = {"a": torch.zeros(3), "b": torch.ones(2, 2, dtype=torch.bfloat16)}
    fp = encoder_fingerprint(EncoderSpec("vit_x", {"depth": 2}, sd))
    assert encoder_fingerprint(EncoderSpec("vit_x", {"depth": 2}, dict(reversed(sd.items())))) == fp
    nudged = {**sd, "a": torch.tensor([0.0, 0.0, 1e-45])}  # the smallest float32 step
    assert encoder_fingerprint(EncoderSpec("vit_x", {"depth": 2}, nudged)) != fp
    assert encoder_fingerprint(EncoderSpec("vit_x", {"depth": 3}, sd)) != fp
    assert encoder_fingerprint(EncoderSpec("vit_y", {"depth": 2}, sd)) != fp


def test_cpu_precision_is_fp32_without_loss_scaling():
    p = Precision.of("auto", CPU)
    assert p.dtype is None and not p.scaler.is_enabled()
    with p.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _formula(lr: float, min_lr: float, w: float, e_total: float, e: float) -> float:
    """The method §7 schedule as written before it moved onto timm (float64)."""
    if e < w:
        return lr * e / w
    if e_total - w <= 0:
        return lr
    t = min(max((e - w) / (e_total - w), 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@pytest.mark.parametrize("lr,min_lr,w,e_total", [(1.6e-3, 1e-6, 40, 1600), (1.25e-4, 1e-6, 1, 3), (2e-3, 1e-5, 1, 5),
                                                 (0.1, 0.0, 5, 50), (1.0, 1.0, 0, 1), (1e-3, 0.0, 3, 3)])
def test_timm_cosine_equals_the_previous_formula(lr, min_lr, w, e_total):
    """timm's CosineLRScheduler, as WarmupCosine drives it, gives today's lr at every fractional epoch the loops ask
    for, to within float rounding (timm computes e·(lr/W) and π·t/T where the formula has lr·e/W and π·(t/T)):
    measured at most 2.2e-13 relative, where the lr nears min_lr."""
    opt = torch.optim.SGD([{"params": [torch.zeros(1)], "lr_scale": 0.5}, {"params": [torch.zeros(1)]}], lr=0.0)
    s = WarmupCosine(opt, lr, min_lr, w, e_total)  # timm's scheduler driven on the optimizer itself
    for step, e in enumerate(np.linspace(0, e_total, 1 + 40 * int(e_total) if e_total < 100 else 4001)):
        want = _formula(lr, min_lr, w, e_total, float(e))
        assert s(step, float(e)) == pytest.approx(want, rel=1e-12, abs=1e-300)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * want, want], rel=1e-12, abs=1e-300)

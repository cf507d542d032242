"""Pretraining: schedule, weight-decay groups, checkpoints, resume after SIGKILL, 2-rank torchrun, NaN stop, stage."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, run_cli
from pretrain_helpers import make_shards, run_fixed

from localmim.config.pretrain import PretrainConfig
from localmim.models import create
from localmim.runtime import checkpoint as ckpt
from localmim.runtime.distributed import DistInfo
from localmim.train.engine import Checkpoints
from localmim.train.optim import create_adamw
from localmim.train.schedule import WarmupCosine
from tests.resume import kill_then_resume, same_weights

TINY = dict(model="localmim_vit_micro_patch8", input_size=32, global_batch=4, batch_size=4, epochs=3, warmup_epochs=1,
            blr=1e-2, num_workers=2, shuffle_buffer=4, log_every=1)


# ------------------------------------------------------------------------------------------- schedule / optim


def _two_groups() -> torch.optim.Optimizer:
    """A layer-decayed group (lr_scale 0.5) and a plain one, their lr 0 (the schedule sets them)."""
    return torch.optim.SGD([{"params": [torch.zeros(1)], "lr_scale": 0.5}, {"params": [torch.zeros(1)]}], lr=0.0)


def test_warmup_cosine_matches_the_spec_formula():
    """timm's scheduler driven on the real optimizer: every group gets the method §7 lr times its lr_scale."""
    opt = _two_groups()
    s = WarmupCosine(opt, lr=1.6e-3, min_lr=1e-6, warmup_epochs=40, epochs=1600)
    for step, e in enumerate(np.linspace(0, 1600, 97)):
        if e < 40:
            want = 1.6e-3 * e / 40
        else:
            want = 1e-6 + (1.6e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (e - 40) / 1560))
        assert s(step, float(e)) == pytest.approx(want, rel=1e-12, abs=1e-18)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * want, want], rel=1e-12, abs=1e-18)
    assert s(0, 40) == pytest.approx(1.6e-3) and s(0, 1600) == pytest.approx(1e-6) and s(0, 820) == pytest.approx(
        (1.6e-3 + 1e-6) / 2)
    whole = WarmupCosine(_two_groups(), lr=1.0, min_lr=0.0, warmup_epochs=2, epochs=2)  # warm-up over the whole run
    assert [whole(0, e) for e in (0.0, 1.0, 1.5, 2.0)] == pytest.approx([0.0, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(warmup_epochs=11), dict(lr=-1.0)])
def test_bad_schedule_is_rejected(kw):
    with pytest.raises(ValueError):
        WarmupCosine(_two_groups(), **{**dict(lr=1.0, min_lr=0.0, warmup_epochs=1, epochs=10), **kw})


def test_weight_decay_groups_follow_spec_2_8():
    model = create("localmim_vit_micro_patch8")
    opt = create_adamw(model, 1e-3, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain
    # method §2.8: no decay for <= 1-D tensors and biases; the cls token and mask tokens (3-D) are decayed.
    want_plain = {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    assert plain == want_plain
    assert "cls_token" in decayed and any("mask_token" in n for n in decayed)
    assert "pos_embed" not in trainable
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_peak_lr_scales_with_effective_batch():
    cfg = PretrainConfig(global_batch=2048, batch_size=256, blr=2e-4)
    assert cfg.peak_lr() == pytest.approx(1.6e-3) and cfg.accum_for(8) == 1  # method §7 ViT-B
    vit_l = PretrainConfig(global_batch=4096, batch_size=128, blr=1.5e-4)
    assert vit_l.peak_lr() == pytest.approx(2.4e-3) and [vit_l.accum_for(w) for w in (1, 8, 32)] == [32, 4, 1]
    assert PretrainConfig(lr=1e-3).peak_lr() == 1e-3
    with pytest.raises(ValueError, match=r"global_batch=4096 is not a multiple of batch_size=128 x world_size=3"):
        vit_l.accum_for(3)
    with pytest.raises(ValueError, match="warmup_epochs=5"):
        PretrainConfig(epochs=4, warmup_epochs=5)


# ------------------------------------------------------------------------------------ accumulation / GPU path


def _cfg_const_lr(**kw) -> PretrainConfig:
    """TINY with a constant lr (no warm-up, min_lr = lr): configs with different step counts see the same lr."""
    return PretrainConfig(**{**TINY, "epochs": 1, "warmup_epochs": 0, "lr": 1e-3, "min_lr": 1e-3, **kw})


def test_accumulation_steps_like_one_big_batch(tmp_path):
    """method §7 with a global batch of 8: ``batch_size 4`` (2 micro-batches per optimizer step) makes the same two
    optimizer steps as ``batch_size 8`` over the same images in the same order with the same masking noise. Plain SGD
    (lr 1, set by the loop's schedule) makes each update the accumulated gradient itself (AdamW would blow float
    noise on ~zero gradients, e.g. the key biases, up to full lr-sized steps). Dividing a micro-batch's loss by
    anything but the cycle length changes the update by up to ~1e-2 here, float reassociation by < 1e-6."""
    torch.manual_seed(5)
    one = torch.rand(8, 16)  # the noise is drawn per forward from the global CPU RNG: [2b, N] must equal 2 x [b, N]
    torch.manual_seed(5)
    assert torch.equal(one, torch.cat([torch.rand(4, 16), torch.rand(4, 16)]))
    imgs = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def train(batch: int) -> dict[str, torch.Tensor]:
        cfg = _cfg_const_lr(global_batch=8, batch_size=batch, lr=1.0, min_lr=1.0)
        model = run_fixed(cfg, list(imgs.split(batch)), tmp_path / f"ck{batch}", sgd=True).model
        return {k: v - init[k] for k, v in model.state_dict().items() if v.is_floating_point()}  # updates

    torch.manual_seed(0)  # build_engine's init seed (cfg.seed)
    init = create("localmim_vit_micro_patch8", img_size=32).state_dict()
    small, big = train(4), train(8)
    assert small["blocks.0.attn.qkv.weight"].abs().max() > 1e-3  # the steps moved the encoder
    for k in small:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model,size,bias", [("localmim_vit_micro_patch8", 32, False),
                                             ("localmim_vit_micro_patch8", 32, True),
                                             ("localmim_swin_nano_p2_64", 64, False)])
def test_pretraining_steps_issue_no_host_sync_on_cuda(tmp_path, monkeypatch, model, size, bias):
    """A training epoch with online HOG targets (with and without the Sobel bias; forward, backward, optimizer
    step, loss bookkeeping) never syncs the device with the host, except the loss read every ``log_every`` steps,
    which is its one intended sync."""
    from localmim.train.engine import LossMeter

    cfg = _cfg_const_lr(model=model, input_size=size, log_every=1000, ckpt_minutes=0, device="cuda", hog_bias=bias)
    batches = [torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8).pin_memory() for _ in range(3)]
    read = LossMeter.read

    def read_allowed(self, *a, **kw):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return read(self, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(LossMeter, "read", read_allowed)
    run_fixed(cfg, batches, None)  # warm-up: lazy CUDA/cuBLAS initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = run_fixed(cfg, batches, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert res.metrics["steps"] == 3


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_is_weights_only_and_restores_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = create_adamw(model, 1e-3, 0.05)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    payload = ckpt.make_payload(model=model, optimizer=opt, scaler=None, epoch=2, step=11, data_batches=3,
                                rng=ckpt.all_rng_states(), params={"a": 1, "b": [1, 2]})
    path = ckpt.save(tmp_path, payload)
    want = (torch.rand(3), np.random.rand(2), random.random())
    (tmp_path / ".ckpt-000000012.pt.tmp-123").write_bytes(b"partial")  # a killed save
    assert ckpt.find_latest(tmp_path) == path and not list(tmp_path.glob(".*tmp*"))
    loaded = torch.load(path, weights_only=True)  # no pickled Python objects inside
    assert loaded["step"] == 11 and loaded["data"] == {"epoch": 2, "batches": 3} and loaded["params"]["b"] == [1, 2]
    m2 = torch.nn.Linear(3, 2)
    o2 = create_adamw(m2, 1e-3, 0.05)
    ckpt.restore(loaded, m2, o2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True))
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    for step in (20, 30, 40):
        ckpt.save(tmp_path, {**payload, "step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000030.pt", "ckpt-000000040.pt"]


# ------------------------------------------------------------------------------------ resume / torchrun / NaN

SCRIPT = """
import os, signal, sys, torch
from localmim.config.pretrain import PretrainConfig
from localmim.train.pretrain import run_pretrain
cfg = PretrainConfig(**{cfg})
kill = os.environ.get("KILL")
def monitor(epochs_done, model):
    return {{"epoch": epochs_done}}  # kept in the checkpoints: the resumed run's result has every epoch's row
def log_fn(metrics, step):
    if kill == "epoch" and step == 4:  # epoch 1, step 1 of 3: right after epoch 0's checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    if kill == "mid" and step == 5:  # epoch 1 after step 2 of 3; a mid-epoch checkpoint exists after step 1
        os.kill(os.getpid(), signal.SIGKILL)
r = run_pretrain(cfg, sys.argv[1], sys.argv[2], log_fn, monitor=monitor, progress=False)
rank = int(os.environ.get("RANK", "0"))
out = {{"state": r.model.state_dict(), "metrics": r.metrics,
        "monitor": [{{k: v for k, v in row.items() if k != "step"}} for row in r.history]}}
torch.save(out, os.path.join(sys.argv[3], f"rank{{rank}}.pt"))
"""


def _script(tmp_path: Path, **cfg) -> Path:
    p = tmp_path / "train.py"
    p.write_text(_source(**cfg))
    return p


def _source(**cfg) -> str:
    return textwrap.dedent(SCRIPT.format(cfg=repr({**TINY, **cfg})))


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=cli_env(**env), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kill", ["epoch", "mid"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, kill):
    make_shards(tmp_path / "s", n=12, per_shard=4)
    extra = {"ckpt_minutes": 1e-9} if kill == "mid" else {}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()

    def checkpointed() -> None:
        assert ckpt.find_latest(next((tmp_path / "ck_a").iterdir())) is not None

    resumed, _ = kill_then_resume(tmp_path, _source(**extra),
                                  lambda t: [str(tmp_path / "s"), str(tmp_path / f"ck_{t}"), str(tmp_path / t)],
                                  {"KILL": kill}, after_kill=checkpointed)
    assert f"(epoch 1, step {4 if kill == 'mid' else 3})" in resumed  # mid-epoch: 1 batch of epoch 1 done
    a, b = torch.load(tmp_path / "a" / "rank0.pt"), torch.load(tmp_path / "b" / "rank0.pt")
    assert a["metrics"]["steps"] == b["metrics"]["steps"] == 9
    assert a["monitor"] == b["monitor"] == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    assert same_weights(a["state"], b["state"])  # bit-identical on CPU
    init = create("localmim_vit_micro_patch8", img_size=32).state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], a["state"]["blocks.0.attn.qkv.weight"])


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    make_shards(tmp_path / "s", n=20, per_shard=3)
    script = _script(tmp_path, epochs=2, ckpt_minutes=0, global_batch=8)
    (tmp_path / "out").mkdir()
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
              str(tmp_path / "s"), str(tmp_path / "ck"), str(tmp_path / "out")], OMP_NUM_THREADS="1")
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "out" / "rank0.pt"), torch.load(tmp_path / "out" / "rank1.pt")
    assert same_weights(r0["state"], r1["state"])
    assert r0["metrics"]["world_size"] == 2 and r0["metrics"]["steps_per_epoch"] == 20 // 2 // 4
    assert r0["metrics"]["peak_lr"] == pytest.approx(1e-2 * 4 * 2 / 256)
    assert math.isfinite(r0["metrics"]["final_loss"])


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import localmim.train.pretrain as P

    make_shards(tmp_path / "s", n=12, per_shard=4)
    real = P.build_pretrain_model

    def poisoned(cfg):
        model = real(cfg)
        calls = {"n": 0}
        forward = model.forward

        def fwd(*a, **kw):
            loss, per_tap, mask = forward(*a, **kw)
            calls["n"] += 1
            return (loss * float("nan") if calls["n"] == 5 else loss), per_tap, mask

        model.forward = fwd
        return model

    monkeypatch.setattr(P, "build_pretrain_model", poisoned)
    cfg = PretrainConfig(**{**TINY, "num_workers": 0, "log_every": 2})
    with pytest.raises(P.NonFiniteLossError, match=r"non-finite loss at step 4 \(epoch 1\).*ckpt-000000003\.pt"):
        P.run_pretrain(cfg, tmp_path / "s", tmp_path / "ck", progress=False)
    (run_dir,) = (tmp_path / "ck").iterdir()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt-000000003.pt"]
    good = ckpt.load(ckpt.find_latest(run_dir))
    assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_changed_params_never_resume_an_old_run(tmp_path):
    from localmim.train.engine import data_fingerprint

    make_shards(tmp_path / "s", n=12, per_shard=4)
    base = PretrainConfig(**TINY)

    def run_dir(cfg, world: int):
        return Checkpoints.of("ck", "pretrain", cfg, DistInfo(0, world, 0, torch.device("cpu")),
                              data=data_fingerprint(tmp_path / "s")).dir

    k = run_dir(base, 1)
    assert run_dir(base.model_copy(update={"num_workers": 0, "log_every": 5}), 1) == k
    assert run_dir(base.model_copy(update={"mask_ratio": 0.6}), 1) != k
    assert run_dir(base.model_copy(update={"global_batch": 8}), 1) != k
    # the global batch is the recipe: another world size or per-device batch resumes the same run
    assert run_dir(base, 2) == k and run_dir(base.model_copy(update={"batch_size": 2}), 2) == k
    (tmp_path / "s" / "train.json").write_text(json.dumps({"shards": []}))
    assert run_dir(base, 1) != k


# ----------------------------------------------------------------------------------------------- the stages


def test_targets_and_pretrain_stages_export_a_plain_timm_encoder(tmp_path):
    import timm

    make_shards(tmp_path / "s", n=12, per_shard=5)
    params = {
        "targets": {"views": 2, "model": "localmim_vit_micro_patch8", "input_size": 32, "workers": 1},
        "pretrain": {**TINY, "epochs": 2, "data": "views", "num_workers": 0},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    run_cli("targets", "s", "views", "--params", "params.yaml", cwd=tmp_path, check=True, LOCALMIM_TRACKING="0")
    p = run_cli("pretrain", "--params", "params.yaml", "--shards", "s", "--views-dir", "views", "--out", "enc",
                "--ckpt-dir", "ck", "--metrics", "m/pretrain.json", "--no-progress", cwd=tmp_path, check=True,
                LOCALMIM_TRACKING="0")
    assert "after 2 epochs" in p.stderr
    metrics = json.loads((tmp_path / "m" / "pretrain.json").read_text())
    assert metrics["epochs_done"] == 2 and metrics["steps"] == 6 and math.isfinite(metrics["final_loss"])
    assert "final_loss_tap1" in metrics and not {"train_seconds", "final_images_per_s"} & set(metrics)
    timing = json.loads((tmp_path / "m" / "pretrain.timing.json").read_text())  # measurements: not a DVC metric
    assert {"final_images_per_s", "final_data_wait_frac", "final_peak_mem_mb", "train_seconds"} <= set(timing)
    info = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert info["timm_name"] == "vit_micro_patch8_32" and not timm.is_model(info["timm_name"])
    model = timm.models.VisionTransformer(num_classes=0, **info["timm_kwargs"])  # the documented plain-timm rule
    state = torch.load(tmp_path / "enc" / "encoder.pt", weights_only=True)
    res = model.load_state_dict(state, strict=False)
    assert not res.unexpected_keys and set(res.missing_keys) <= {"fc_norm.weight", "fc_norm.bias"}
    ck = torch.load(ckpt.find_latest(next((tmp_path / "ck").iterdir())), weights_only=True)
    assert torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert ck["params"]["data"] == "views" and ck["git_commit"] and ck["data"] == {"epoch": 2, "batches": 0}
    sched, peak = ck["extra"]["schedule"], 1e-2 * 4 / 256  # the last step's lr: epoch 1 + 2/3 of warm-up 1, cosine
    want = 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (5 / 3 - 1) / 1))
    assert sched["at_epoch"] == 2 and sched["set_at_step"] == 5 and sched["lr"] == pytest.approx(want, rel=1e-9)
    # views built for another geometry are refused with both values named
    params["pretrain"]["hog_nbins"] = 18
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    bad = run_cli("pretrain", "--params", "params.yaml", "--views-dir", "views", "--ckpt-dir", "ck", "--out", "x",
                  "--no-progress", cwd=tmp_path, LOCALMIM_TRACKING="0")
    assert bad.returncode == 1 and "hog_nbins: views 9 vs model 18" in bad.stderr
    assert os.environ.get("RANK") is None

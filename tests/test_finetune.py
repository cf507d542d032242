"""Fine-tuning (method §8): accuracy on tiny shards, best checkpoint reproducible in plain timm, layer-decay
scales (§8.1), position-embedding interpolation (§14.3), resume, exact data splitting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from localmim.config.finetune import FinetuneConfig
from localmim.data.classify import ClassifyShards, decode_sample, iter_tar_samples, make_loader
from localmim.models.encoder_io import build_classifier, read_encoder
from localmim.models.layer_decay import layer_decay_groups
from localmim.stages.finetune import write_outputs
from localmim.train.finetune import FinetuneData, finetune
from tests.classify_data import eval_images, make_shards, plain_timm, pretrained_micro_encoder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    train = make_shards(root, "train", 40)
    val = make_shards(root, "val", 10, seed=1)
    enc = pretrained_micro_encoder(train, root / "encoder", steps=20)
    return {"root": root, "train": train, "val": val, "encoder": enc}


def _cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=6, warmup_epochs=1, global_batch=16, batch_size=16, lr=2e-3, num_workers=0, device="cpu",
                layer_decay=0.75)
    return FinetuneConfig(**{**base, **kw})


def _eval_independently(model: torch.nn.Module, val_dir: Path, size: int) -> tuple[float, float]:
    """Top-1 (%) and mean CE of ``model`` on the val images, preprocessed by the test's own eval transform."""
    x, y = eval_images(val_dir, size)
    with torch.no_grad():
        logits = model.eval()(x)
    return 100.0 * (logits.argmax(1) == y).double().mean().item(), F.cross_entropy(logits, y).item()


def _data(data, ckpt_dir) -> FinetuneData:
    return FinetuneData(data["train"], data["val"], ckpt_dir)


def test_finetune_beats_chance_and_best_checkpoint_reproduces(data, tmp_path):
    """Proves the loop trains and the written outputs are what was evaluated: the reported best/last top-1 and
    val loss are reproduced by plain timm + the test's own eval transform. Beating chance here does NOT show that
    pre-training helps: a colour per class gives the labels away (see test_embedded_learning)."""
    logged = []
    res = finetune(_cfg(), read_encoder(data["encoder"]), _data(data, tmp_path / "ckpt"),
                   log_fn=lambda m, s: logged.append((s, m)))
    assert res.run_dir.parent == tmp_path / "ckpt"
    write_outputs(res, res.run_dir, tmp_path / "out")
    chance = 100.0 / 4
    m = res.metrics
    assert m["best_top1"] >= 2 * chance, res.history
    steps = m["steps_per_epoch"]  # optimizer steps: 160 images / global batch 16
    assert steps == 10 and [s for s, r in logged if "top1" in r] == [steps * e for e in range(1, 7)]
    assert m["epochs_done"] == 6 and m["best_top1"] == max(r["top1"] for r in res.history)
    # plain timm, nothing from localmim: model.json's spec + best.pt weights
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    info = card["spec"]
    assert card["task"] == "classify" and card["weights"] == "best.pt" and card["other_weights"] == ["last.pt"]
    assert info["timm_name"] == "vit_micro_patch8_32" and card["info"]["best_epoch"] == m["best_epoch"]
    model = plain_timm(info)
    model.load_state_dict(torch.load(tmp_path / "out" / "best.pt", weights_only=True))
    top1, loss = _eval_independently(model, data["val"], info["timm_kwargs"]["img_size"])
    best_row = res.history[m["best_epoch"] - 1]
    assert top1 == pytest.approx(m["best_top1"], abs=1e-9)
    assert loss == pytest.approx(best_row["val_loss"], abs=1e-4)
    last = plain_timm(info)
    last.load_state_dict(torch.load(tmp_path / "out" / "last.pt", weights_only=True))
    assert _eval_independently(last, data["val"], 32)[0] == pytest.approx(m["top1"], abs=1e-9)


def test_layer_decay_scales_match_spec(data):
    """method §8.1 for ViT: ids 0 (cls, pos, patch embed), i+1 (block i), L = D+1 (rest); scale decay^(L-id);
    no weight decay on 1-D params, pos_embed and cls_token."""
    decay, wd = 0.65, 0.05
    model = build_classifier(read_encoder(data["encoder"]), 4)
    depth = len(model.blocks)
    L = depth + 1
    groups = layer_decay_groups(model, wd, decay)
    where = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(where) == len(names)
    for name, p in names.items():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            lid = 0
        elif name.startswith("blocks."):
            lid = int(name.split(".")[1]) + 1
        else:
            lid = L
        g = where[id(p)]
        assert g["lr_scale"] == pytest.approx(decay ** (L - lid), rel=1e-12), name
        no_wd = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert g["weight_decay"] == (0.0 if no_wd else wd), name
    assert where[id(names["head.weight"])]["lr_scale"] == 1.0
    assert where[id(names[f"blocks.{depth - 1}.attn.qkv.weight"])]["lr_scale"] == pytest.approx(decay)
    assert where[id(names["patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(decay**L)


def test_pos_embed_interpolated_when_resolution_differs(data):
    enc = read_encoder(data["encoder"])
    src = enc.state_dict["pos_embed"]  # [1, 1+4*4, d] at 32 px, patch 8
    same = build_classifier(enc, 4)
    assert torch.equal(same.pos_embed.detach(), src)
    big = build_classifier(enc, 4, input_size=64)  # grid 8x8
    pe = big.pos_embed.detach()
    d = src.shape[-1]
    assert pe.shape == (1, 1 + 64, d)
    assert torch.equal(pe[:, :1], src[:, :1])  # cls slot unchanged
    grid = src[0, 1:].reshape(4, 4, d).permute(2, 0, 1)[None].double()  # [1, d, 4, 4]
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(64, d)
    torch.testing.assert_close(pe[0, 1:].double(), want, atol=1e-5, rtol=1e-5)
    assert big(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    assert big.head.weight.std().item() < 1e-4 and torch.all(big.head.bias == 0)  # trunc-normal std 2e-5 head


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path):
    """Delete the newest checkpoint (as if killed during the last epoch); the resumed run ends bit-identical."""
    from localmim.runtime.checkpoint import list_checkpoints

    enc = read_encoder(data["encoder"])
    cfg = _cfg(epochs=3, warmup_epochs=1)
    full = finetune(cfg, enc, _data(data, tmp_path / "ca"))
    a = torch.load(full.run_dir / "last.pt", weights_only=True)
    ckpts = list_checkpoints(full.run_dir)
    ckpts[-1].unlink()  # the epoch-3 checkpoint is gone: the resumed run restarts at epoch 3
    res = finetune(cfg, enc, _data(data, tmp_path / "ca"))
    assert [r["epoch"] for r in res.history] == [1, 2, 3] and res.run_dir == full.run_dir
    b = torch.load(res.run_dir / "last.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.history[-1] == full.history[-1]
    # other params -> not resumed from the stale checkpoint (which stays intact in its own run directory)
    kept = [p.name for p in list_checkpoints(full.run_dir)]
    fresh = finetune(_cfg(epochs=1, warmup_epochs=0), enc, _data(data, tmp_path / "ca"))
    assert [r["epoch"] for r in fresh.history] == [1] and fresh.run_dir != full.run_dir
    assert [p.name for p in list_checkpoints(fresh.run_dir)] == [f"ckpt-{len(fresh.history) * 10:09d}.pt"]
    assert [p.name for p in list_checkpoints(full.run_dir)] == kept
    # another encoder (one weight moved), same params -> not resumed from `fresh` either: it trains its epoch
    other = read_encoder(data["encoder"])
    other.state_dict["blocks.0.attn.qkv.weight"] = other.state_dict["blocks.0.attn.qkv.weight"] + 1e-3
    logged = []
    again = finetune(_cfg(epochs=1, warmup_epochs=0), other, _data(data, tmp_path / "ca"),
                     log_fn=lambda m, s: logged.append(s))
    assert set(logged) == {10} and again.run_dir not in (full.run_dir, fresh.run_dir)


@pytest.mark.parametrize("world,workers,train", [(2, 2, False), (2, 2, True), (1, 2, True)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(data, world, workers, train):
    """Labels identify samples only up to class, so tag each sample by its (position-independent) image bytes."""
    from localmim.data import classify

    keyed = {}

    def tf(img):  # image -> its exact pixel checksum: identifies the sample
        return torch.tensor(float(np.asarray(img, dtype=np.int64).sum()))

    n = classify.count_samples(data["train"])
    seen = []
    for rank in range(world):
        ds = ClassifyShards(data["train"], tf, batch_size=6, train=train, rank=rank, world=world, seed=3)
        ds.set_epoch(1)
        batches = list(make_loader(ds, workers))
        assert len(batches) == len(ds)
        for x, _ in batches:
            seen += x.tolist()
    for url in sorted(data["train"].glob("*.tar")):
        for s in iter_tar_samples(url):
            keyed[float(np.asarray(decode_sample(s)[0], dtype=np.int64).sum())] = s["__key__"]
    assert len(keyed) == n  # checksums are unique on this data
    assert len(seen) == len(set(seen))  # nothing twice
    expect = (n // world // 6) * 6 * world if train else n
    assert len(seen) == expect and set(seen) <= set(keyed)


@pytest.mark.slow
def test_stage_under_torchrun_two_ranks(data, tmp_path):
    """The real CLI under torchrun (2 CPU processes, gloo): every val sample counted once across the ranks, the
    best weights load into plain timm and reproduce the reported top-1, metrics JSON written by rank 0."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import cli_env

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": _cfg(epochs=2, warmup_epochs=1, global_batch=32).to_dict()}))
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "localmim.cli",
           "finetune", "--encoder", str(data["encoder"]), "--train", str(data["train"]), "--val", str(data["val"]),
           "--out", str(out), "--ckpt-dir", str(tmp_path / "ckpt"), "--metrics", str(metrics), "--params", str(params)]
    p = subprocess.run(cmd, cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(metrics.read_text())
    assert m["val_samples"] == 40 and m["epochs"] == 2
    info = json.loads((out / "model.json").read_text())["spec"]
    model = plain_timm(info)
    model.load_state_dict(torch.load(out / "best.pt", weights_only=True))
    assert _eval_independently(model, data["val"], 32)[0] == pytest.approx(m["best_top1"], abs=1e-9)


def test_swin_layer_decay_scales_match_spec():
    """method §8.1 for Swin, written out for depths (2, 2, 2, 2): patch embed 0; block j of stage s
    2s + j + 1; the merge after stage s (timm: ``layers.{s+1}.downsample``) 2(s+1); final norm / head 9.
    Relative-position-bias tables keep weight decay; 1-D params and biases do not."""
    import timm

    decay, wd = 0.9, 0.05
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, patch_size=2, embed_dim=32,
                              depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, num_classes=10)
    where = {id(p): g for g in layer_decay_groups(model, wd, decay) for p in g["params"]}
    expect_ids = {"patch_embed.proj.weight": 0, "layers.0.blocks.0.mlp.fc1.weight": 1,
                  "layers.0.blocks.1.attn.qkv.weight": 2, "layers.1.downsample.reduction.weight": 2,
                  "layers.1.blocks.0.attn.proj.weight": 3, "layers.2.downsample.norm.weight": 4,
                  "layers.3.blocks.1.mlp.fc2.weight": 8, "norm.weight": 9, "head.fc.weight": 9,
                  "layers.2.blocks.1.attn.relative_position_bias_table": 6}
    params = dict(model.named_parameters())
    assert len(where) == len(params)
    for name, lid in expect_ids.items():
        assert where[id(params[name])]["lr_scale"] == pytest.approx(decay ** (9 - lid)), name
    for name, p in params.items():
        no_wd = p.ndim <= 1 or name.endswith(".bias")
        assert where[id(p)]["weight_decay"] == (0.0 if no_wd else wd), name
    assert where[id(params["layers.2.blocks.1.attn.relative_position_bias_table"])]["weight_decay"] == wd


def test_accumulation_steps_like_one_big_batch(tmp_path):
    """method §8 with a global batch of 8: ``batch_size 4`` (2 micro-batches per step) makes the same two optimizer
    steps as ``batch_size 8`` (same init, data order, constant lr; drop path and dropout off), through the training
    loop. Plain SGD makes each update the accumulated gradient itself; a loss not divided by the cycle length would
    double every update of the small batches."""
    import timm
    from pretrain_helpers import FixedBatches

    from localmim.runtime.distributed import DistInfo
    from localmim.runtime.precision import Precision
    from localmim.train import loop
    from localmim.train.engine import Engine
    from localmim.train.finetune import FinetuneMethod
    from localmim.train.schedule import WarmupCosine

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 5, (16,), generator=g)

    def train(batch: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=5, drop_path_rate=0.0)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(layer_decay_groups(model, 0.0, 0.75), lr=0.0)
        cpu = torch.device("cpu")
        eng = Engine(model, model, opt, Precision.of("none", cpu), DistInfo(0, 1, 0, cpu))
        cfg = _cfg(global_batch=8, batch_size=batch, epochs=1, warmup_epochs=0, lr=1.0, min_lr=1.0)
        data = FixedBatches([(x[a:a + batch], y[a:a + batch]) for a in range(0, 16, batch)])
        method = FinetuneMethod(cfg, eng, data, None, None, torch.nn.CrossEntropyLoss(), tmp_path)
        plan = loop.Plan("finetune", 1, 2, ("train_loss",), cfg.accum_for(1), loop.Cadence(eval_every=0),
                         eval_at_end=False, progress=False)
        loop.run(method, eng, WarmupCosine(opt, 1.0, 1.0, 0, 1), plan)
        return {k: v - init[k] for k, v in model.state_dict().items()}

    small, big = train(4), train(8)
    assert small["head.weight"].abs().max() > 1e-2 and small["blocks.0.attn.qkv.weight"].abs().max() > 1e-4
    for k in small:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


def test_swin_classifier_pools_then_applies_a_fresh_layer_norm():
    """method §8.2 Swin: logits = head(LayerNorm(mean of the stage-4 tokens)), the LayerNorm fresh (1, 0, eps
    1e-6), no per-token norm; encoder weights loaded; head and its norm train at the top layer-decay id."""
    from localmim.models import create
    from localmim.models.encoder_io import EncoderSpec
    from localmim.models.swin import export_swin_encoder

    torch.manual_seed(0)
    name, kwargs, sd = export_swin_encoder(create("localmim_swin_nano_p2_64"))
    net = build_classifier(EncoderSpec(name, kwargs, sd), 7).eval()
    assert torch.equal(net.layers[2].blocks[1].attn.qkv.weight, sd["layers.2.blocks.1.attn.qkv.weight"])
    with torch.no_grad():
        net.head.fc.weight.normal_()  # the fresh head is ~0; make the logits informative
        x = torch.randn(3, 3, 64, 64)
        tokens = net.layers(net.patch_embed(x))  # [B, 4, 4, 8C] NHWC, before any final norm
        pooled = tokens.double().mean(dim=(1, 2))  # [B, 8C]
        z = (pooled - pooled.mean(1, keepdim=True)) / torch.sqrt(pooled.var(1, unbiased=False, keepdim=True) + 1e-6)
        want = z @ net.head.fc.weight.double().T + net.head.fc.bias.double()
        torch.testing.assert_close(net(x).double(), want, rtol=1e-4, atol=1e-5)
    assert torch.all(net.head.norm.weight == 1) and torch.all(net.head.norm.bias == 0)
    assert not any(n.startswith("norm.") for n, _ in net.named_parameters())
    where = {id(p): g for g in layer_decay_groups(net, 0.05, 0.9) for p in g["params"]}
    for n in ("head.norm.weight", "head.fc.weight"):
        assert where[id(dict(net.named_parameters())[n])]["lr_scale"] == 1.0, n


def test_sample_without_label_names_its_shard_and_key(tmp_path):
    """A labelled shard whose sample lacks ``cls`` stops the epoch with an error naming the sample and shard."""
    import io as _io

    from PIL import Image

    from localmim.data.shards import tario

    buf = _io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    with tario.ShardSink(tmp_path, "train", max_samples=10) as sink:
        sink.write(tario.tar_members("a", {"jpg": buf.getvalue(), "cls": b"0"}))
        sink.write(tario.tar_members("b", {"jpg": buf.getvalue()}))
    ds = ClassifyShards(tmp_path, lambda im: torch.zeros(3, 8, 8), batch_size=2, train=False)
    with pytest.raises(ValueError, match=r"sample b of .*train-000000\.tar: no cls entry"):
        list(make_loader(ds, 0))

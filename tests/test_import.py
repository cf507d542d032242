"""``localmim import``: reference-format checkpoints (tests/fixtures/reference, made by the reference code) imported,
loaded into plain timm from the export and compared with the reference encoders' recorded outputs; strictness of the
key accounting; our own checkpoints through the same command; the DAG's import node; downstream stages on an import."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from localmim.models.convert import Source, convert, load_checkpoint
from localmim.models.convert_rules import TAP_NORM
from tests.classify_data import make_shards, plain_timm
from tests.conftest import ROOT

REF = Path(__file__).resolve().parent / "fixtures" / "reference"
EXPECTED = torch.load(REF / "expected.pt", weights_only=True)
# how each fixture is imported: the ViTs are 16 wide (2 heads), which the weights cannot tell; the Swin is 32 px
ARGS = {"localmim_vit": ["--from", "localmim-vit", "--num-heads", "2"],
        "mae_vit": ["--from", "mae", "--num-heads", "2"],
        "localmim_swin": ["--from", "localmim-swin", "--img-size", "32"]}


def _cli(*args: str, check: bool = True) -> tuple[int, str]:
    """``localmim ARGS`` in this process (no interpreter start-up: ~6 s CPU each), no tracking, the repository's
    params file unless ``--params`` is given; returns (exit code, stderr)."""
    from localmim.cli import main

    params = [] if "--params" in args else ["--params", str(ROOT / "params.yaml")]
    err = io.StringIO()
    with mock.patch.dict(os.environ, {"LOCALMIM_TRACKING": "0"}), contextlib.redirect_stderr(err):
        rc = main([*args, *params])
    if check and rc != 0:
        raise AssertionError(f"localmim {' '.join(args)} failed ({rc}):\n{err.getvalue()}")
    return rc, err.getvalue()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """As tests/fixtures/reference/regenerate.py: uint8 -> ImageNet-normalised float32."""
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """Every fixture through the CLI (in this process, no tracking)."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for name, args in ARGS.items():
        _, err = _cli("import", str(REF / f"{name}.pth"), *args, "--out", str(root / name))
        assert "every key filled" in err and "mapped" in err, err  # the accounting is printed
        out[name] = root / name
    return out


def _plain(export: Path, **overrides) -> torch.nn.Module:
    """The export in plain timm: the model encoder.json describes, weights by torch's own load_state_dict."""
    info = json.loads((export / "encoder.json").read_text())
    net = plain_timm(info, num_classes=0, **overrides).eval()
    result = net.load_state_dict(torch.load(export / "encoder.pt", weights_only=True), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(info["imported"]["accounting"]["fresh"])
    return net


def _vit_blocks(net: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    x, outs = net._pos_embed(net.patch_embed(normalize(images))), []
    for blk in net.blocks:
        x = blk(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("name", ["localmim_vit", "mae_vit"])
def test_vit_every_block_equals_the_reference(imported, name):
    exp = EXPECTED[name]
    with torch.no_grad():
        got = _vit_blocks(_plain(imported[name]), exp["images"])
        last = _plain(imported[name]).forward_features(normalize(exp["images"]))
    assert len(got) == len(exp["blocks"]) == 5
    for g, want in zip(got, exp["blocks"], strict=True):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, exp["blocks"][-1], atol=1e-5, rtol=1e-5)  # fresh final norm: raw last block


@pytest.mark.parametrize("name,key", [("localmim_vit", "last_tap"), ("mae_vit", "norm")])
def test_final_norm_tap_reproduces_the_reference_top_output(name, key):
    """``final_norm='tap'``: timm's pre-pooling norm is the last tap LayerNorm (MAE: its final norm)."""
    conv = convert(load_checkpoint(REF / f"{name}.pth"), num_heads=2, final_norm="tap")
    assert conv.accounting.fresh == [] and conv.arch.timm_kwargs["fc_norm"] is False
    net = plain_timm({"timm_name": conv.arch.timm_name, "timm_kwargs": conv.arch.timm_kwargs}, num_classes=0).eval()
    net.load_state_dict(conv.state_dict)  # strict: nothing fresh
    with torch.no_grad():
        got = net.forward_features(normalize(EXPECTED[name]["images"]))
    torch.testing.assert_close(got, EXPECTED[name][key], atol=1e-5, rtol=1e-5)


def _swin_stages(net: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    x, outs = net.patch_embed(normalize(images)), []
    for layer in net.layers:
        x = layer(x)
        outs.append(x)
    return outs


def test_swin_every_stage_equals_the_reference_finetuning_swin(imported):
    """Plain timm (LayerNorm eps 1e-5 everywhere) within 1e-3; with the reference fine-tuning model's eps (1e-6,
    but 1e-5 in each block's norm2; method §13.10) every stage is equal to 1e-5 (fp32 kernels differ by CPU: 2.3e-6
    seen on an AMD EPYC), while plain timm's eps differs by more: eps is the only difference."""
    exp = EXPECTED["localmim_swin"]
    with torch.no_grad():
        got = _swin_stages(_plain(imported["localmim_swin"]), exp["images"])
        net = _plain(imported["localmim_swin"], norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
        for layer in net.layers:
            for blk in layer.blocks:
                blk.norm2.eps = 1e-5
        exact = _swin_stages(net, exp["images"])
    assert [g.shape for g in got] == [w.shape for w in exp["stages"]] and len(got) == 4
    for g, e, want in zip(got, exact, exp["stages"], strict=True):
        torch.testing.assert_close(g, want, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(e, want, atol=1e-5, rtol=1e-5)
        assert (g - want).abs().max() > 1e-5  # the plain-timm eps is a visible difference at this tolerance


def test_swin_accounting_agrees_with_the_reference_finetuning_load(imported):
    """The reference's fine-tuning load left the tap norms unused and the final norm missing: our rules drop the
    same number of tap-norm keys and leave the same norm fresh."""
    info = json.loads((imported["localmim_swin"] / "encoder.json").read_text())
    acc, exp = info["imported"]["accounting"], EXPECTED["localmim_swin"]
    assert acc["dropped"][TAP_NORM] == len(exp["load_unexpected"]) == 8
    assert set(acc["fresh"]) == {k for k in exp["load_missing"] if k.startswith("norm.")}
    assert acc["layout"] == "ref-swin" and info["timm_kwargs"]["img_size"] == 32


def test_encoder_only_mae_release_imports_the_same(tmp_path):
    """MAE's released pre-training checkpoints hold the encoder only: same blocks as the full model's."""
    sd = load_checkpoint(REF / "mae_vit.pth").state_dict
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "enc.pth")
    a, b = (convert(load_checkpoint(p), num_heads=2) for p in (REF / "mae_vit.pth", tmp_path / "enc.pth"))
    assert a.state_dict.keys() == b.state_dict.keys() and all(torch.equal(a.state_dict[k], b.state_dict[k])
                                                                for k in a.state_dict)
    assert b.accounting.source_keys == len(enc) and "decoder (pre-training only)" not in b.accounting.dropped


def test_pos_embed_resampled_to_the_target_size():
    """``img_size`` 32 for the 16-px ViT: the patch grid 4x4 -> 8x8 bicubic (cls slot kept), recorded."""
    src = load_checkpoint(REF / "localmim_vit.pth")
    conv = convert(src, num_heads=2, img_size=32)
    old, new = src.state_dict["pos_embed"], conv.state_dict["pos_embed"]
    assert conv.accounting.resampled == {"pos_embed": ([1, 17, 16], [1, 65, 16])}
    assert torch.equal(new[:, :1], old[:, :1])
    grid = old[:, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 64, 16))
    assert conv.arch.timm_name == "vit_d16x5_patch4_32"


def _sd(name: str) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(REF / f"{name}.pth").state_dict)


@pytest.mark.parametrize("change,kwargs,message", [
    (lambda sd: sd.update({"blocks.0.attn.extra": torch.zeros(1)}), {}, "blocks.0.attn.extra"),
    (lambda sd: sd.update({"module.fc.weight": torch.zeros(1)}), {}, "match no rule"),
    (lambda sd: sd.pop("blocks.3.attn.proj.weight"), {}, "blocks.3.attn.proj.weight"),
    (lambda sd: None, {"model": "localmim_vit_micro_patch8"}, "blocks.4"),  # depth 4 vs 5: the extra keys named
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks.4.")], {"model": "localmim_vit_micro_patch8"},
     "shapes differ.*blocks.0"),
    (lambda sd: None, {"num_heads": None}, "--num-heads"),
    (lambda sd: None, {"fmt": "mae"}, "--from localmim-vit"),
    (lambda sd: None, {"model": "localmim_swin_nano_p2_64"}, "is a SWIN"),
])
def test_strict_accounting_names_what_is_wrong(change, kwargs, message):
    sd = _sd("localmim_vit")
    change(sd)
    with pytest.raises(ValueError, match=message):
        convert(Source(sd), **{"num_heads": 2, **kwargs})


def test_swin_stored_relative_position_index_is_checked():
    sd = _sd("localmim_swin")
    key = "encoder.layers.1.blocks.0.attn.relative_position_index"
    sd[key] = sd[key].flip(0)
    with pytest.raises(ValueError, match=key):
        convert(Source(sd), img_size=32)


def test_swin_input_size_is_assumed_and_said_when_the_weights_cannot_tell():
    conv = convert(load_checkpoint(REF / "localmim_swin.pth"))
    assert conv.arch.timm_kwargs["img_size"] == 224 and any("224 px assumed" in n for n in conv.arch.notes)


class _Opaque:  # a pickled object weights_only refuses
    pass


def test_checkpoint_needing_pickled_objects_is_refused_with_the_way_out(tmp_path):
    """The training args (argparse.Namespace) load; anything else is refused, naming it and the command to run."""
    assert "argparse.Namespace" in load_checkpoint(REF / "localmim_vit.pth").notes[0]
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _sd("mae_vit"), "args": argparse.Namespace(x=_Opaque())}, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "_Opaque" in msg and "weights_only=False" in msg and "ckpt.weights.pt" in msg


def test_ddp_prefix_is_removed_and_said(tmp_path):
    sd = _sd("mae_vit")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    src = load_checkpoint(tmp_path / "ddp.pth")
    assert src.state_dict.keys() == sd.keys() and "module." in src.notes[0]


def test_cli_errors_name_the_file(tmp_path):
    torch.save({"epoch": 3, "model": [1, 2]}, tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for name in ("bad.pth", "junk.pth"):
        rc, err = _cli("import", str(tmp_path / name), "--out", str(tmp_path / "o"), check=False)
        assert rc == 1 and name in err.strip().splitlines()[-1], err
    rc, err = _cli("import", str(REF / "mae_vit.pth"), "--num-heads", "2", "--sha256", "0" * 64, "--out",
                   str(tmp_path / "o"), check=False)
    assert rc == 1 and "differs from imported.sha256" in err, err
    assert not (tmp_path / "o" / "encoder.pt").exists()


@pytest.mark.parametrize("name,family", [("localmim_vit_micro_patch8", "vit"), ("localmim_swin_nano_p2_64", "swin")])
def test_our_pretraining_checkpoint_imports_to_the_pretrain_export(tmp_path, name, family):
    """A checkpoint of ours (runtime/checkpoint.py format) -> exactly what pretrain's write_encoder exports."""
    from localmim.config.pretrain import PretrainConfig
    from localmim.models import create
    from localmim.models.encoder_io import write_encoder
    from localmim.runtime import checkpoint as ckpt

    torch.manual_seed(0)
    model = create(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = PretrainConfig(model=name, input_size=model.img_size)
    payload = ckpt.make_payload(model=model, optimizer=None, scaler=None, epoch=1, step=2, data_batches=0,
                                rng=[ckpt.rng_state()], params=cfg.to_dict())
    path = ckpt.save(tmp_path / "ckpt", payload)
    write_encoder(model, tmp_path / "pretrain", {})
    _cli("import", str(path), "--from", f"localmim-{family}", "--out", str(tmp_path / "imp"))
    want, got = (json.loads((tmp_path / d / "encoder.json").read_text()) for d in ("pretrain", "imp"))
    assert (got["timm_name"], got["timm_kwargs"], got["model"]) == (want["timm_name"], want["timm_kwargs"], name)
    a, b = (torch.load(tmp_path / d / "encoder.pt", weights_only=True) for d in ("pretrain", "imp"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dag_placeholder_is_constant_and_pretrain_takes_an_import(tmp_path, imported):
    """The DAG's node writes the same bytes whatever the other params while the source is null; ``pretrain
    --imported`` copies an import without touching data (missing shards) and trains when it holds a placeholder."""
    contents = []
    for fmt in ("auto", "mae"):
        out = tmp_path / f"ph-{fmt}"
        _cli("import", "--placeholder-unless-source", "--from", fmt, "--out", str(out))
        contents.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert contents[0] == contents[1] and list(contents[0]) == ["PLACEHOLDER.json"]
    common = ["--shards", str(tmp_path / "missing"), "--ckpt-dir", str(tmp_path / "ck"), "--device", "cpu",
              "--no-progress", "--knn-val", str(tmp_path / "missing")]
    _cli("pretrain", "--imported", str(imported["localmim_vit"]), "--out", str(tmp_path / "pre"), "--metrics",
         str(tmp_path / "m.json"), *common)
    for f in ("encoder.pt", "encoder.json", "params.yaml"):
        assert (tmp_path / "pre" / f).read_bytes() == (imported["localmim_vit"] / f).read_bytes()
    assert json.loads((tmp_path / "m.json").read_text()) == {"imported": 1.0}
    rc, err = _cli("pretrain", "--imported", str(tmp_path / "ph-auto"), "--out", str(tmp_path / "pre2"), "--metrics",
                   str(tmp_path / "m2.json"), *common, check=False)
    assert rc == 1 and "missing" in err.strip().splitlines()[-1], err


def test_downstream_stages_run_from_an_import(tmp_path, imported):
    """linprobe (ViT import) and finetune (Swin import) through the CLI on tiny shards, as from a pre-trained one."""
    train = make_shards(tmp_path, "train", 8, per_shard=16)
    val = make_shards(tmp_path, "val", 4, seed=1, per_shard=16)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "linprobe": {"epochs": 2, "warmup_epochs": 1, "global_batch": 16, "batch_size": 16, "num_workers": 0,
                     "device": "cpu"},
        "finetune": {"epochs": 1, "warmup_epochs": 0, "global_batch": 8, "batch_size": 8, "num_workers": 0,
                     "device": "cpu", "drop_path": 0.0}}))
    data = ["--train", str(train), "--val", str(val), "--params", str(params)]
    _cli("linprobe", "--encoder", str(imported["localmim_vit"]), "--out", str(tmp_path / "lp"), "--metrics",
         str(tmp_path / "lp.json"), *data)
    _cli("finetune", "--encoder", str(imported["localmim_swin"]), "--out", str(tmp_path / "ft"), "--ckpt-dir",
         str(tmp_path / "ck"), "--metrics", str(tmp_path / "ft.json"), *data)
    lp, ft = (json.loads((tmp_path / f).read_text()) for f in ("lp.json", "ft.json"))
    assert lp["epochs"] == 2 and 0 <= lp["top1"] <= 100
    assert ft["epochs"] == 1 and ft["val_samples"] == 16
    assert lp["chance_top1"] == ft["chance_top1"] == 100 / 4  # make_shards' 4 classes: the report's baseline
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["spec"]["timm_kwargs"]["img_size"] == 32

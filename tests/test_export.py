"""Tests of the LocalMIMViT -> timm ViT export (method §8.2, §13.14 and 16)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from localmim.models import create
from localmim.models.encoder_io import create_timm_encoder
from localmim.models.export import convert_state_dict, export_encoder, load_pretrained_into_timm
from localmim.models.vit import LocalMIMViT

MICRO = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=2, decoder_dim=32, decoder_heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trained_like(**kw) -> LocalMIMViT:
    """A micro model whose weights are perturbed away from the init (LN affine included), as after training."""
    torch.manual_seed(0)
    m = LocalMIMViT(**{**MICRO, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _timm(name, kwargs, **extra):
    """Plain timm: the registered name, else ``VisionTransformer`` from the full kwargs (the documented rule)."""
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, **{**kwargs, **extra}).eval()
    assert name.startswith("vit_")
    return timm.models.VisionTransformer(**{**kwargs, **extra}).eval()


@pytest.mark.parametrize("final_norm,missing", [("fresh", {"fc_norm.weight", "fc_norm.bias", "head.weight",
                                                            "head.bias"}),
                                                ("tap", {"head.weight", "head.bias"})])
def test_keys_load_cleanly(final_norm, missing):
    m = _trained_like()
    name, kwargs, sd = export_encoder(m, final_norm=final_norm)
    assert not any(k.startswith(("tap_norms", "decoders", "heads", "hog")) for k in sd)
    t = _timm(name, kwargs, num_classes=10)
    got_missing, unexpected = load_pretrained_into_timm(t, sd)
    assert unexpected == [] and set(got_missing) == missing


def test_fresh_export_matches_encoder_blocks():
    """Default export: timm blocks reproduce every tap (before the tap LN) on unmasked input."""
    m = _trained_like()
    name, kwargs, sd = export_encoder(m)
    assert kwargs["global_pool"] == "avg" and kwargs["fc_norm"] is True
    t = _timm(name, kwargs, num_classes=0)
    load_pretrained_into_timm(t, sd)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = m.forward_features(x)  # LN_k(h_{T_k}), each [B, 1+N, d]
        inter = t.forward_intermediates(x, indices=m.taps, return_prefix_tokens=True, output_fmt="NLC",
                                        intermediates_only=True)
        feats = t.forward_features(x)  # norm is Identity -> raw output of the last block
    assert len(inter) == 4
    for k, (spatial, prefix) in enumerate(inter):
        h = torch.cat([prefix, spatial], dim=1)  # [B, 1+N, d]
        torch.testing.assert_close(m.tap_norms[k](h), ours[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.tap_norms[-1](feats), ours[-1], rtol=1e-5, atol=1e-5)


def test_tap_export_reproduces_top_output_and_pooling():
    m = _trained_like()
    name, kwargs, sd = export_encoder(m, final_norm="tap")
    t = _timm(name, kwargs, num_classes=0)
    load_pretrained_into_timm(t, sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        top = m.forward_features(x)[-1]
        torch.testing.assert_close(t.forward_features(x), top, rtol=1e-5, atol=1e-5)
        # global_pool='avg' without fc_norm: mean of the normalised patch tokens (cls excluded)
        torch.testing.assert_close(t(x), top[:, 1:].mean(1), rtol=1e-5, atol=1e-5)


def test_forward_features_equals_masked_path_at_ratio_zero():
    """The unmasked feature path equals the masked encoder at r=0 after undoing the shuffle."""
    m = _trained_like()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = m.forward_features(x)
        taps, mask, ids_restore = m.forward_encoder(x, 0.0)
    assert mask.sum() == 0
    for k in range(4):
        patches = taps[k][:, 1:].gather(1, ids_restore[..., None].expand(-1, -1, 64))  # back to raster order
        torch.testing.assert_close(patches, full[k][:, 1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(taps[k][:, :1], full[k][:, :1], rtol=1e-5, atol=1e-5)


def test_pos_embed_copied_and_trainable():
    m = _trained_like()
    t = create_timm_encoder(m, num_classes=3)
    assert isinstance(t.pos_embed, torch.nn.Parameter) and t.pos_embed.requires_grad
    assert torch.equal(t.pos_embed.detach(), m.pos_embed)
    assert torch.all(t.pos_embed[0, 0] == 0)  # cls slot of the sin-cos embedding
    assert torch.equal(t.cls_token.detach(), m.cls_token.detach())
    assert torch.all(t.head.bias == 0) and t.head.weight.std() < 1e-4  # new head, trunc-normal std 2e-5
    assert t(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_pos_embed_bicubic_resampling_to_new_grid():
    m = _trained_like()  # 32 px, patch 8 -> 4x4 grid
    t = create_timm_encoder(m, num_classes=0, img_size=64)  # 8x8 grid
    assert t.pos_embed.shape == (1, 1 + 64, 64)
    old = m.pos_embed[0, 1:].T.reshape(1, 64, 4, 4)  # [1, d, 4, 4]
    want = F.interpolate(old.double(), size=(8, 8), mode="bicubic", align_corners=False)
    want = want.reshape(64, 64).T  # [64 tokens, d]
    np.testing.assert_allclose(t.pos_embed[0, 1:].detach().double().numpy(), want.numpy(), atol=1e-5)
    assert torch.equal(t.pos_embed[0, :1].detach(), m.pos_embed[0, :1])
    assert t.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 65, 64)


def test_head_dropped_only_if_shape_differs():
    m = _trained_like()
    name, kwargs, sd = export_encoder(m)
    sd = dict(sd, **{"head.weight": torch.ones(7, 64), "head.bias": torch.ones(7)})
    t = _timm(name, kwargs, num_classes=5)
    missing, unexpected = load_pretrained_into_timm(t, sd)
    assert "head.weight" in missing and unexpected == [] and not torch.all(t.head.weight == 1)
    t = _timm(name, kwargs, num_classes=7)
    missing, _ = load_pretrained_into_timm(t, sd)
    assert "head.weight" not in missing and torch.all(t.head.weight == 1)


def test_convert_state_dict_from_checkpoint_and_mae_mode():
    m = _trained_like(mode="mae", target="pixel")
    sd = convert_state_dict(m.state_dict(), final_norm="tap")
    assert torch.equal(sd["norm.weight"], m.tap_norms[0].weight.detach())
    name, kwargs, _ = export_encoder(m, final_norm="tap")
    t = _timm(name, kwargs, num_classes=0)
    missing, unexpected = load_pretrained_into_timm(t, sd)
    assert missing == [] and unexpected == []
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.forward_features(x), m.forward_features(x)[-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="final_norm"):
        convert_state_dict(m.state_dict(), final_norm="last")


@pytest.mark.parametrize("model,timm_name", [("localmim_vit_small_patch16", "vit_small_patch16_224"),
                                             ("localmim_vit_base_patch16", "vit_base_patch16_224"),
                                             ("localmim_vit_large_patch16", "vit_large_patch16_224")])
def test_reference_sizes_map_to_timm_names(model, timm_name):
    with torch.device("meta"):
        m = create(model)
        name, kwargs, sd = export_encoder(m)
        t = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
    assert name == timm_name
    own = {k: tuple(v.shape) for k, v in t.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, s in own.items() if k in sd}
    assert set(own) - set(sd) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def test_export_rejects_other_models():
    with pytest.raises(TypeError, match="LocalMIMViT"):
        export_encoder(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("model,label", [("localmim_vit_micro_patch8", "vit_micro_patch8_32"),
                                         ("localmim_vit_tiny_patch8", "vit_tiny_patch8_64"),
                                         ("localmim_swin_nano_p2_64", "swin_nano_patch2_window4_64"),
                                         ("localmim_swin_base_w14", "swin_base_patch4_window14_224"),
                                         ("localmim_swin_base", "swin_base_patch4_window7_224")])
def test_exported_labels_say_what_the_model_is(model, label):
    """Width word, patch size, (window,) resolution in the name; the kwargs agree with it, and the model
    builds in timm from the label (registered name) or from the family class."""
    from localmim.models.encoder_io import create_timm_model
    from localmim.models.swin import LocalMIMSwin, export_swin_encoder

    with torch.device("meta"):
        m = create(model)
    name, kwargs, _ = (export_swin_encoder if isinstance(m, LocalMIMSwin) else export_encoder)(m)
    assert name == label
    assert f"patch{kwargs['patch_size']}_" in name and name.endswith(f"_{kwargs['img_size']}")
    if "window_size" in kwargs:
        assert f"window{kwargs['window_size']}_" in name
    with torch.device("meta"):
        net = create_timm_model(name, num_classes=0, **kwargs)
    assert net.patch_embed.proj.kernel_size == (kwargs["patch_size"],) * 2


def test_old_encoder_json_with_a_registered_name_still_builds():
    """Files written before the honest labels named a registered timm model whose kwargs were overridden."""
    from localmim.models.encoder_io import EncoderSpec, build_classifier

    m = _trained_like()
    _, kwargs, sd = export_encoder(m)
    net = build_classifier(EncoderSpec("vit_base_patch16_224", kwargs, sd), 3)
    assert net.patch_embed.proj.kernel_size == (8, 8) and net.embed_dim == kwargs["embed_dim"]
    assert torch.equal(net.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])

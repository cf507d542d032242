"""Export a pre-trained LocalMIMViT encoder to a plain timm ``VisionTransformer`` (method §8.2, §13.14, §13.16).

The encoder already uses timm's ``PatchEmbed`` and ``Block``, so the blocks, patch embedding and cls token map
key-for-key. The fixed sin-cos position embedding is copied (it becomes trainable in timm). The tap
LayerNorms, decoders, heads and HOG biases are pre-training only and are dropped.

Final norm: the reference encoder has no separate final LayerNorm; the last tap's LN plays that role
(§13.16). Fine-tuning in the reference uses global average pooling over the patch tokens followed by
a *new* LayerNorm (§8: mean -> LN -> head), i.e. timm's ``global_pool='avg', fc_norm=True``, where timm sets
``norm = Identity`` and ``fc_norm`` is fresh. That is our default (``final_norm='fresh'``): faithful to §8.2,
so only ``fc_norm`` and ``head`` are missing. With ``final_norm='tap'`` the last tap LN is copied into timm's
pre-pool ``norm`` (``fc_norm=False``) so ``forward_features`` reproduces the pre-trained top output exactly
(tokens normalised, then pooled); only ``head`` is missing. This also makes cls-token pooling
(``global_pool='token'``) work, which the reference cannot do (§13.14).
"""

from __future__ import annotations

from typing import Any

from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from localmim.models.vit import LocalMIMViT

# Widths/depths/heads with a conventional size word (timm's, plus the small-image "micro").
_VIT_SIZES = {(64, 4, 2): "micro", (192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base",
              (1024, 24, 16): "large"}
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.")


def vit_label(dim: int, depth: int, heads: int, patch: int, img: int | tuple[int, int]) -> str:
    """``vit_<size>_patch<p>_<S>``: what the model is, e.g. ``vit_tiny_patch8_64``; for the reference sizes it is
    timm's own name (``vit_base_patch16_224``). Unlisted sizes read ``vit_d<dim>x<depth>_...``."""
    size = _VIT_SIZES.get((dim, depth, heads), f"d{dim}x{depth}")
    res = img if isinstance(img, int) else f"{img[0]}x{img[1]}"
    return f"vit_{size}_patch{patch}_{res}"


def vit_timm_spec(img_size: int | tuple[int, int], patch_size: int, embed_dim: int, depth: int, num_heads: int,
                  mlp_ratio: float, final_norm: str = "fresh", global_pool: str = "avg") -> tuple[str, dict[str, Any]]:
    """``(timm_name, timm_kwargs)`` of the plain timm ViT an encoder is exported to (pre-training and
    ``localmim import`` alike); see the module docstring for ``final_norm``."""
    name = vit_label(embed_dim, depth, num_heads, patch_size, img_size)
    kwargs = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                  num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, class_token=True,
                  global_pool=global_pool, fc_norm=final_norm == "fresh")
    return name, kwargs


def timm_spec_of(model: LocalMIMViT, final_norm: str = "fresh", global_pool: str = "avg") -> tuple[str, dict[str, Any]]:
    """:func:`vit_timm_spec` of a LocalMIMViT (its weights are not read: a model on the meta device will do)."""
    blk = model.blocks[0]
    dim = model.cls_token.shape[-1]
    return vit_timm_spec(model.img_size, model.patch_size, dim, len(model.blocks), blk.attn.num_heads,
                         blk.mlp.fc1.out_features / dim, final_norm, global_pool)


def convert_state_dict(state_dict: dict[str, Tensor], final_norm: str = "fresh") -> dict[str, Tensor]:
    """Map a LocalMIMViT pre-training state dict to timm ``VisionTransformer`` keys.

    Args:
        state_dict: ``LocalMIMViT.state_dict()`` (e.g. loaded from a checkpoint).
        final_norm: ``'fresh'`` drops every tap LN; ``'tap'`` maps the last tap LN to timm's ``norm``.

    Returns:
        encoder-only state dict (cloned tensors).
    """
    if final_norm not in ("fresh", "tap"):
        raise ValueError(f"final_norm must be 'fresh' or 'tap', got {final_norm!r}")
    out = {k: v.detach().clone() for k, v in state_dict.items() if k.startswith(_ENCODER_PREFIXES)}
    if final_norm == "tap":
        last = max(int(k.split(".")[1]) for k in state_dict if k.startswith("tap_norms."))
        for p in ("weight", "bias"):
            out[f"norm.{p}"] = state_dict[f"tap_norms.{last}.{p}"].detach().clone()
    return out


def export_encoder(model: LocalMIMViT, final_norm: str = "fresh",
                   global_pool: str = "avg") -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """Turn a pre-trained LocalMIMViT into ``(timm_model_name, timm_kwargs, state_dict)``.

    ``localmim.models.encoder_io.create_timm_model(name, **timm_kwargs)`` builds the matching plain timm ViT
    (``timm.create_model`` for a registered name, else ``timm.models.VisionTransformer(**timm_kwargs)``);
    ``state_dict`` loads into it with :func:`load_pretrained_into_timm`. See the module docstring for ``final_norm``.

    Args:
        model: pre-trained LocalMIMViT (either mode).
        final_norm: ``'fresh'`` (method §8.2: new pooling LN) or ``'tap'`` (last tap LN as timm ``norm``).
        global_pool: timm pooling, ``'avg'`` (reference) or ``'token'`` (only sensible with ``final_norm='tap'``).
    """
    if not isinstance(model, LocalMIMViT):
        raise TypeError(f"export_encoder expects a LocalMIMViT, got {type(model).__name__}")
    name, kwargs = timm_spec_of(model, final_norm, global_pool)
    return name, kwargs, convert_state_dict(model.state_dict(), final_norm)


def resample_pos_embed(pos_embed: Tensor, timm_model: nn.Module) -> Tensor:
    """``[1, 1+N, d]`` -> the patch grid of ``timm_model`` (a timm ViT): bicubic over the grid, cls slot kept."""
    grid = list(timm_model.patch_embed.grid_size)
    out = resample_abs_pos_embed(pos_embed, new_size=grid, num_prefix_tokens=1, interpolation="bicubic",
                                 antialias=False)
    if out.shape != timm_model.pos_embed.shape:
        raise ValueError(f"cannot resample pos_embed {tuple(pos_embed.shape[1:])} to "
                         f"{tuple(timm_model.pos_embed.shape[1:])}")
    return out


def load_pretrained_into_timm(timm_model: nn.Module, state_dict: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Load an exported encoder state dict non-strictly into a timm ViT (method §8.2).

    The position embedding is resampled bicubically over the patch grid when the grid differs (cls slot
    kept); a checkpoint ``head`` is dropped only if its shape differs.

    Returns:
        ``(missing_keys, unexpected_keys)``.
    """
    sd = dict(state_dict)
    own = timm_model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], timm_model)
    for k in ("head.weight", "head.bias"):
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            del sd[k]
    result = timm_model.load_state_dict(sd, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


__all__ = ["convert_state_dict", "export_encoder", "load_pretrained_into_timm", "resample_pos_embed", "timm_spec_of",
           "vit_timm_spec"]

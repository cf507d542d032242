"""The target architecture of ``localmim import``: from a registry name, or read off the tensor shapes.

Everything but two numbers is in the shapes. ViT attention heads are not (``qkv`` is ``[3d, d]`` for any head
count): they are the usual heads of the width (ViT-S/B/L/H: 6/12/16/16; width/64 otherwise) unless ``num_heads``
says. Swin's input size is not either (it has no absolute position embedding): a stage whose window is smaller than
the configured one was clamped to the stage's resolution and gives it away; otherwise 224 px is assumed, the only
size the reference can pre-train at (method §13.4). Every such decision is returned as a note, printed by the command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# width -> heads of the standard ViTs (timm's S/B/L/H and this repository's micro)
_VIT_HEADS = {64: 2, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
SWIN_DEFAULT_SIZE = 224


@dataclass
class Arch:
    """A target timm encoder: ``create_timm_model(timm_name, **timm_kwargs)``; ``model`` is the registry name when
    known (recorded in ``encoder.json`` as pre-training does)."""

    family: str
    timm_name: str
    timm_kwargs: dict[str, Any]
    model: str | None = None
    notes: list[str] = field(default_factory=list)


def from_registry(name: str, img_size: int = 0, final_norm: str = "fresh") -> Arch:
    """The encoder of registry model ``name`` (e.g. ``localmim_vit_base_patch16``), built on the meta device."""
    from localmim.models.export import timm_spec_of
    from localmim.models.registry import create
    from localmim.models.swin import LocalMIMSwin, swin_label

    with torch.device("meta"):  # geometry only, no weights
        model = create(name, **({"img_size": img_size} if img_size else {}))
    if isinstance(model, LocalMIMSwin):
        kwargs = {k: v for k, v in model.encoder.timm_kwargs.items() if k != "norm_layer"}
        return Arch("swin", swin_label(kwargs), kwargs, name, [f"architecture of {name}"])
    timm_name, kwargs = timm_spec_of(model, final_norm)
    return Arch("vit", timm_name, kwargs, name, [f"architecture of {name}"])


def vit_from_shapes(sd: dict[str, Tensor], num_heads: int | None = None, img_size: int = 0,
                    final_norm: str = "fresh") -> Arch:
    """A timm ViT read off timm-keyed encoder weights (see the module docstring for heads)."""
    from localmim.models.export import vit_timm_spec

    _need(sd, "cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.bias")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    tokens = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed holds {tokens} patch positions, not a square grid: pass --model")
    notes = [f"ViT: width {dim}, depth {depth}, patch {patch}, MLP ratio {ratio:g}, pre-trained at {grid * patch} px "
             f"(pos_embed grid {grid}x{grid}), read off the shapes"]
    if num_heads is None:
        num_heads = _VIT_HEADS.get(dim) or (dim // 64 if dim % 64 == 0 else None)
        if num_heads is None:
            raise ValueError(f"the weights do not tell the attention heads of width {dim}: pass --num-heads "
                             f"(or --model)")
        notes.append(f"{num_heads} attention heads: the usual for width {dim} (not in the weights; --num-heads "
                     f"to change)")
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    size = img_size or grid * patch
    name, kwargs = vit_timm_spec(size, patch, dim, depth, num_heads, ratio, final_norm)
    return Arch("vit", name, kwargs, None, notes)


def swin_from_shapes(sd: dict[str, Tensor], img_size: int = 0) -> Arch:
    """A timm SwinTransformer read off timm-keyed encoder weights (see the module docstring for the input size)."""
    from localmim.models.swin import swin_label
    from localmim.models.swin_encoder import NUM_STAGES, validate_swin_geometry

    _need(sd, "patch_embed.proj.weight", "layers.0.blocks.0.mlp.fc1.weight")
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depths, heads, windows = [], [], []
    for i in range(NUM_STAGES):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise ValueError(f"no blocks for Swin stage {i + 1} (layers.{i}.blocks.*): a Swin has {NUM_STAGES} stages")
        table = sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"]  # [(2w-1)^2, heads]
        depths.append(len(blocks))
        heads.append(int(table.shape[1]))
        windows.append((math.isqrt(table.shape[0]) + 1) // 2)
    window = max(windows)
    ratio = sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dim
    notes = [f"Swin: C {dim}, depths {tuple(depths)}, heads {tuple(heads)}, window {window}, patch {patch}, MLP ratio "
             f"{ratio:g}, read off the shapes"]
    if not img_size:
        clamped = [i for i, w in enumerate(windows) if w < window]
        if clamped:  # that stage's resolution equals its clamped window
            img_size = windows[clamped[0]] * patch * 2 ** clamped[0]
            notes.append(f"input {img_size} px: stage {clamped[0] + 1}'s window is clamped to its resolution")
        else:
            img_size = SWIN_DEFAULT_SIZE
            notes.append(f"input {img_size} px assumed (not in the weights; the reference pre-trains at 224 only, "
                         f"method §13.4; --img-size to change)")
    try:
        validate_swin_geometry(img_size, patch, window, dim, heads)
    except ValueError as e:
        raise ValueError(f"input {img_size} px: {e}; pass --img-size (or --model)") from None
    kwargs = dict(img_size=img_size, patch_size=patch, embed_dim=dim, depths=tuple(depths), num_heads=tuple(heads),
                  window_size=window, mlp_ratio=ratio)
    return Arch("swin", swin_label(kwargs), kwargs, None, notes)


def _need(sd: dict[str, Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"cannot read the architecture off the weights: missing {', '.join(missing)}")

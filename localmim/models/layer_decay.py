"""Layer-wise learning-rate decay (method §8.1) for every stage that trains an exported encoder: fine-tuning,
and the segmentation / detection backbones, which hold the encoder under a prefix (e.g. ``backbone.encoder.``).

Layer ids: ViT: cls token, position and patch embedding 0, ``blocks.i`` i+1, everything else (final norm, heads,
necks, decoders) depth+1. Swin: :func:`swin_layer_id`. A parameter with id ``i`` gets ``lr_scale =
layer_decay ** (top - i)``, so everything outside the encoder trains at the full rate.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Param groups with ``lr_scale`` and ``weight_decay`` following method §8.1.

    ViT: timm's ``param_groups_layer_decay`` matches method §8.1 exactly. Its ``group_matcher`` puts cls
    token, position and patch embedding in group 0, ``blocks.i`` in group i+1 and every unmatched name
    (``fc_norm``, ``head``) in the last group L = depth+1; scale = decay^(L - id). No weight decay for ≤1-D
    tensors and ``model.no_weight_decay()`` (``pos_embed``, ``cls_token``).

    Swin: timm's grouping differs from method §8.1 in three places (it gives a patch-merging layer the id of
    the next stage's first block, the final norm the last block's id, and lists the relative-position-bias
    tables as no-decay), so :func:`swin_layer_decay_groups` builds the method §8.1 groups directly.
    """
    from timm.models.swin_transformer import SwinTransformer
    from timm.optim import param_groups_layer_decay

    if isinstance(model, SwinTransformer):
        return swin_layer_decay_groups(model, weight_decay, layer_decay)
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=nwd, layer_decay=layer_decay)


def swin_layer_id(name: str, depths: list[int]) -> int:
    """method §8.1 Swin layer id of a timm ``SwinTransformer`` parameter name.

    timm runs the merge of stage s-1 at the start of stage s (``layers.{s}.downsample``); method §8.1 gives the merge
    after stage s-1 the id of that stage's last block, Σ_{t<s} depths[t].
    """
    if name.startswith("patch_embed"):
        return 0
    parts = name.split(".")
    if parts[0] == "layers":
        s = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[:s])
        if parts[2] == "blocks":
            return sum(depths[:s]) + int(parts[3]) + 1
    return sum(depths) + 1  # final norm, head


def swin_layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """method §8.1 groups for a timm Swin: scale decay^(Dsum+1-id); no weight decay on 1-D params, biases and an
    absolute position embedding; relative-position-bias tables keep weight decay."""
    return param_groups_with_decay(model, model, "", weight_decay, layer_decay)


def vit_layer_id(name: str, depth: int) -> int:
    """Method §8.1 layer id of a timm ``VisionTransformer`` parameter name (see the module docstring)."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def encoder_layer_ids(encoder: nn.Module) -> tuple[Callable[[str], int], int]:
    """``(layer_id(name), top)`` for a timm ViT or Swin: ids of the encoder's own parameter names, and the id of
    everything above the encoder."""
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(encoder, SwinTransformer):
        depths = [len(layer.blocks) for layer in encoder.layers]
        return (lambda n: swin_layer_id(n, depths)), sum(depths) + 1
    depth = len(encoder.blocks)
    return (lambda n: vit_layer_id(n, depth)), depth + 1


_NO_DECAY_NAMES = ("pos_embed", "cls_token", "absolute_pos_embed", "reg_token")


def param_groups_with_decay(model: nn.Module, encoder: nn.Module, prefix: str, weight_decay: float,
                            layer_decay: float) -> list[dict]:
    """AdamW param groups for ``model`` holding ``encoder`` at ``prefix`` (``""``: the model is the encoder).

    No weight decay on ≤1-D tensors, biases, position embeddings and tokens. Every group carries ``lr_scale``
    (applied by :func:`localmim.train.engine.set_lr`) and ``layer_id``.
    """
    layer_id, top = encoder_layer_ids(encoder)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = name[len(prefix):] if name.startswith(prefix) else None
        lid = layer_id(inner) if inner is not None else top
        no_wd = p.ndim <= 1 or name.endswith(".bias") or (inner or "").split(".")[0] in _NO_DECAY_NAMES
        g = groups.setdefault((lid, no_wd), {"params": [], "lr_scale": layer_decay ** (top - lid), "layer_id": lid,
                                             "weight_decay": 0.0 if no_wd else weight_decay})
        g["params"].append(p)
    return list(groups.values())

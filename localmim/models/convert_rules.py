"""Key rules of ``localmim import``: how every key of a pre-training checkpoint maps onto timm, or why it is dropped.

A source checkpoint's state dict has one of five *layouts*, told apart by its keys:

* ``ref-vit``: the reference LocalMIM ViT (timm-style encoder keys; four tap LayerNorms ``norm.0..3``; decoders
  ``decoder.<k>.*``; HOG Sobel filters ``hog_enc.<k>.conv.*``);
* ``mae``: MAE's ViT (the same encoder keys; one final ``norm``; ``decoder_*`` and ``mask_token``, absent from the
  encoder-only releases);
* ``ref-swin``: the reference LocalMIM Swin (``encoder.*`` with the reference's own Swin module names, patch merging at
  the *end* of stages 1-3; tap LayerNorms ``encoder.norm.0..3``; decoders; HOG filters);
* ``ours-vit`` / ``ours-swin``: this repository's pre-training checkpoints (``tap_norms``, ``decoders``, ``heads``,
  ``hog_biases``; the Swin encoder already has timm's names under ``encoder.``).

Each layout has an ordered list of :class:`Rule`: the first rule whose pattern matches a key (``re.fullmatch``)
either maps it to a timm key or drops it with the rule's name. Dropping follows this repository's own export
(method §8.2): tap LayerNorms, MAE's final LayerNorm, decoders and target layers are pre-training only; the fine-tuning
classifier starts a fresh LayerNorm after pooling. ``final_norm='tap'`` instead maps the last tap LayerNorm (MAE: its
final norm) onto timm's pre-pooling ``norm``, as ``export_encoder(final_norm='tap')`` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

LAYOUTS = ("ref-vit", "mae", "ref-swin", "ours-vit", "ours-swin")
FAMILY = {"ref-vit": "vit", "mae": "vit", "ours-vit": "vit", "ref-swin": "swin", "ours-swin": "swin"}
# --from value -> layouts it accepts (our own checkpoints of that family go through the same command)
FORMATS = {"localmim-vit": ("ref-vit", "ours-vit"), "localmim-swin": ("ref-swin", "ours-swin"),
           "mae": ("mae", "ours-vit")}
_HINT = {"ref-vit": "localmim-vit", "ours-vit": "localmim-vit", "mae": "mae", "ref-swin": "localmim-swin",
         "ours-swin": "localmim-swin"}

TAP_NORM = "tap LayerNorm (method §8.2: fresh LayerNorm after pooling)"
MAE_NORM = "MAE final LayerNorm (method §8.2: fresh LayerNorm after pooling)"
DECODER = "decoder (pre-training only)"
HOG = "HOG layer (target computation)"
REL_INDEX = "relative-position index (a constant timm rebuilds; checked equal)"


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match) -> ``target(match)`` (a timm key) when ``target`` is set, else dropped as ``name``."""

    name: str
    pattern: str
    target: Callable[[re.Match], str] | None = None


def _same(m: re.Match) -> str:
    return m.string


def _strip(prefix: str) -> Callable[[re.Match], str]:
    return lambda m: m.string.removeprefix(prefix)


def _merge_to_next_stage(m: re.Match) -> str:
    # the reference merges at the end of stage i (layers.i.downsample), timm at the start of stage i+1
    return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"


def _to_norm(m: re.Match) -> str:
    return f"norm.{m.group('p')}"


ENCODER = "encoder"
MERGE = "encoder (patch merging: end of stage i -> start of timm stage i+1)"
_VIT_ENCODER = [Rule(ENCODER, r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)", _same),
                Rule(ENCODER, r"blocks\.\d+\..+", _same)]


def detect_layout(keys: set[str]) -> str:
    """The layout of a state dict (see the module docstring), or ValueError naming a few keys."""
    has = lambda pattern: any(re.fullmatch(pattern, k) for k in keys)  # noqa: E731
    if has(r"encoder\.layers\..+"):
        return "ours-swin" if has(r"tap_norms\..+") else "ref-swin"
    if has(r"blocks\.\d+\..+") and "cls_token" in keys:
        if has(r"tap_norms\..+"):
            return "ours-vit"
        if has(r"norm\.\d+\.(weight|bias)|decoder\.\d+\..+|hog_enc\..+"):
            return "ref-vit"
        if has(r"norm\.(weight|bias)|decoder_.+|mask_token"):
            return "mae"
    raise ValueError(f"not a LocalMIM (ViT/Swin) or MAE pre-training state dict; first keys: {sorted(keys)[:6]}")


def check_format(fmt: str, layout: str) -> None:
    """``fmt`` (``--from``; ``auto`` accepts any) must accept ``layout``; else ValueError saying which fits."""
    if fmt != "auto" and layout not in FORMATS[fmt]:
        raise ValueError(f"the checkpoint looks like a {layout} state dict, not --from {fmt}; use --from "
                         f"{_HINT[layout]} (or auto)")


_TAP_PREFIX = {"ref-vit": "norm.", "ref-swin": "encoder.norm.", "ours-vit": "tap_norms.", "ours-swin": "tap_norms."}


def last_tap(keys: set[str], layout: str) -> str | None:
    """The key prefix of the last tap LayerNorm (MAE: the final norm): what ``final_norm='tap'`` maps to ``norm``."""
    if layout == "mae":
        return "norm." if "norm.weight" in keys else None
    prefix = _TAP_PREFIX[layout]
    found = [int(m.group(1)) for k in keys if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", k))]
    return f"{prefix}{max(found)}." if found else None


def rules(layout: str, final_norm: str, tap_prefix: str | None) -> list[Rule]:
    """The ordered rules of ``layout``; with ``final_norm='tap'`` the keys under ``tap_prefix`` go to ``norm``."""
    first = []
    if final_norm == "tap":
        if tap_prefix is None:
            raise ValueError("final_norm 'tap': the checkpoint has no tap / final LayerNorm to keep")
        first = [Rule("kept tap LayerNorm -> norm (final_norm 'tap')", re.escape(tap_prefix) + r"(?P<p>weight|bias)",
                      _to_norm)]
    if layout == "ref-vit":
        rest = [*_VIT_ENCODER, Rule(TAP_NORM, r"norm\.\d+\.(weight|bias)"), Rule(DECODER, r"decoder\.\d+\..+"),
                Rule(HOG, r"hog_enc\.\d+\.conv\.(weight|bias)")]
    elif layout == "mae":
        rest = [*_VIT_ENCODER, Rule(MAE_NORM, r"norm\.(weight|bias)"),
                Rule(DECODER, r"decoder_(embed|blocks|norm|pred)\..+|decoder_pos_embed|mask_token")]
    elif layout == "ours-vit":
        rest = [*_VIT_ENCODER, *_OURS_PRETRAIN_ONLY]
    elif layout == "ref-swin":
        rest = [Rule(REL_INDEX, r"encoder\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index"),
                Rule(ENCODER, r"encoder\.patch_embed\.(proj|norm)\.(weight|bias)", _strip("encoder.")),
                Rule(ENCODER, r"encoder\.layers\.\d+\.blocks\.\d+\..+", _strip("encoder.")),
                Rule(MERGE, r"encoder\.layers\.(\d+)\.downsample\.((?:norm|reduction)\.(?:weight|bias))",
                     _merge_to_next_stage),
                Rule(TAP_NORM, r"encoder\.norm\.\d+\.(weight|bias)"), Rule(DECODER, r"decoder\.\d+\..+"),
                Rule(HOG, r"hog_enc\.\d+\.conv\.(weight|bias)")]
    elif layout == "ours-swin":
        rest = [Rule(ENCODER, r"encoder\..+", _strip("encoder.")), *_OURS_PRETRAIN_ONLY]
    else:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return first + rest


_OURS_PRETRAIN_ONLY = [Rule(TAP_NORM, r"tap_norms\.\d+\.(weight|bias)"), Rule(DECODER, r"(decoders|heads)\.\d+\..+"),
                       Rule(HOG, r"hog_biases")]


def apply_rules(keys: list[str], rule_list: list[Rule]) -> tuple[dict[str, tuple[str, str | None]], list[str]]:
    """``({source key: (rule name, timm key or None when dropped)}, unmatched source keys)``."""
    decided, unmatched = {}, []
    for k in keys:
        for r in rule_list:
            m = re.fullmatch(r.pattern, k)
            if m is not None:
                decided[k] = (r.name, None if r.target is None else r.target(m))
                break
        else:
            unmatched.append(k)
    return decided, unmatched

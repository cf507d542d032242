"""``localmim import``: a released pre-training checkpoint -> this repository's encoder export (method §8.2).

Sources: the reference LocalMIM ViT and Swin checkpoints, MAE's, and this repository's own pre-training checkpoints
(``{'model': state_dict, ...}`` or a bare state dict). The result is what ``pretrain`` writes: a plain timm state
dict with ``(timm_name, timm_kwargs)`` (:func:`localmim.models.encoder_io.write_encoder_files`).

Loading is strict, with an accounting (:class:`Accounting`): every source key is mapped to a timm key or dropped by a
named rule (:mod:`localmim.models.convert_rules`), every key of the target timm model is filled except the ones the
classifier starts fresh by design (method §8.2: ViT ``fc_norm``, Swin ``norm``; none with ``final_norm='tap'``
for ViT), and shapes agree; anything else is a ValueError naming the keys. A ViT position embedding is resampled
(bicubic, cls slot kept, as for fine-tuning) when the target input size differs. Checkpoints are read with
``weights_only=True``; the training args the reference and MAE pickle into their checkpoints
(``argparse.Namespace``, a plain attribute container) are allowed, any other pickled object is refused with the way out.
"""

from __future__ import annotations

import argparse
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from localmim.models.convert_arch import Arch, from_registry, swin_from_shapes, vit_from_shapes
from localmim.models.convert_rules import FAMILY, REL_INDEX, apply_rules, check_format, detect_layout, last_tap, rules

# Globals a checkpoint may need beyond weights_only's defaults: the training args (plain values in an attribute bag).
SAFE_PICKLES = {"argparse.Namespace": argparse.Namespace}
OUR_FORMAT = "localmim-checkpoint/1"  # localmim.runtime.checkpoint.FORMAT (models may not import train)


@dataclass
class Source:
    """A loaded checkpoint: its state dict, our pre-training params when it is one of ours, and loading notes."""

    state_dict: dict[str, Tensor]
    params: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def load_checkpoint(path: str | Path) -> Source:
    """Read a checkpoint with ``weights_only=True`` (see the module docstring) and find its state dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    notes = []
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:  # not a torch file, truncated, ...
        raise ValueError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path)
        if not needed:  # not a zip checkpoint, or not a checkpoint at all: torch's own reason
            why = " ".join(str(e).partition("WeightsUnpickler error:")[2].split("Check the documentation")[0].split())
            why = why or str(e).splitlines()[0]
            raise ValueError(f"{path}: cannot be read with weights_only=True: {why}") from None
        refused = [g for g in needed if g not in SAFE_PICKLES]
        if refused:
            raise ValueError(_refusal(path, refused)) from None
        with torch.serialization.safe_globals([SAFE_PICKLES[g] for g in needed]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
        notes.append(f"allowed pickled {', '.join(needed)} (the training args, plain values)")
    sd, params = _state_dict_of(path, payload)
    if all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        notes.append("removed the DistributedDataParallel prefix 'module.' from every key")
    return Source(sd, params, notes)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: nothing to list, the refusal names none
        return []


def _refusal(path: Path, refused: list[str]) -> str:
    new = path.with_name(path.stem + ".weights.pt")
    return (f"{path}: holds pickled objects that weights_only loading refuses ({', '.join(refused)}). If you trust "
            f"the file, keep only its weights and import that file: python -c \"import torch; "
            f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'model': c.get('model', c)}}, '{new}')\"")


def _state_dict_of(path: Path, payload: Any) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    params = None
    if isinstance(payload, dict) and payload.get("format") == OUR_FORMAT:
        params = payload.get("params") if isinstance(payload.get("params"), dict) else None
    if isinstance(payload, dict):
        for key in ("model", "state_dict"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload:
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict, ...}}, got {type(payload).__name__}")
    bad = [k for k, v in payload.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: no state dict found (top-level keys {sorted(map(str, payload))[:8]}); "
                         f"non-tensor entries: {bad[:5]}")
    return payload, params


@dataclass
class Accounting:
    """What became of every key. ``mapped``/``dropped`` count source keys per rule name; ``fresh`` are target keys
    left to the fine-tuning classifier by design; ``resampled`` are target keys resized (old, new shape)."""

    layout: str
    mapped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    resampled: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    @property
    def source_keys(self) -> int:
        return sum(self.mapped.values()) + sum(self.dropped.values())

    def lines(self) -> list[str]:
        out = [f"source: {self.layout} state dict, {self.source_keys} keys = "
               f"{sum(self.mapped.values())} mapped + {sum(self.dropped.values())} dropped"]
        out += [f"  mapped   {n:5d}  {rule}" for rule, n in self.mapped.items()]
        out += [f"  dropped  {n:5d}  {rule}" for rule, n in self.dropped.items()]
        out += [f"  resampled       {k}: {old} -> {new}" for k, (old, new) in self.resampled.items()]
        out.append(f"target: every key filled but {len(self.fresh)} fresh by design (method §8.2): "
                   f"{', '.join(self.fresh) or 'none'}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "mapped": self.mapped, "dropped": self.dropped, "fresh": self.fresh,
                "resampled": self.resampled}


@dataclass
class Converted:
    arch: Arch
    state_dict: dict[str, Tensor]
    accounting: Accounting


def convert(src: Source, fmt: str = "auto", model: str | None = None, img_size: int = 0,
            num_heads: int | None = None, final_norm: str = "fresh") -> Converted:
    """Map ``src`` onto a timm encoder strictly (see the module docstring).

    Args:
        src: the loaded checkpoint.
        fmt: ``--from``: ``localmim-vit``, ``localmim-swin``, ``mae`` (checked against the keys) or ``auto``.
        model: registry name of the target architecture; None: our checkpoint's own, else read off the shapes.
        img_size: target input size (0: the source's); a ViT position embedding is resampled to it.
        num_heads: ViT heads when inferring from shapes (None: the usual heads of the width).
        final_norm: ``fresh`` (method §8.2) or ``tap`` (last tap LayerNorm / MAE's norm -> timm ``norm``).
    """
    if final_norm not in ("fresh", "tap"):
        raise ValueError(f"final_norm must be 'fresh' or 'tap', got {final_norm!r}")
    sd = src.state_dict
    layout = detect_layout(set(sd))
    check_format(fmt, layout)
    decided, unmatched = apply_rules(list(sd), rules(layout, final_norm, last_tap(set(sd), layout)))
    if unmatched:
        raise ValueError(f"{len(unmatched)} source keys match no rule of a {layout} checkpoint: {_names(unmatched)}")
    acc = Accounting(layout)
    state = {}
    for k, (rule, target) in decided.items():
        count = acc.mapped if target is not None else acc.dropped
        count[rule] = count.get(rule, 0) + 1
        if target in state:
            raise ValueError(f"two source keys map to {target}: {k} and another")
        if target is not None:
            state[target] = sd[k].detach().clone()
    arch = _target_arch(layout, state, src.params, model, img_size, num_heads, final_norm)
    net = _build(arch)
    _fill_check(net, state, arch, final_norm, acc)
    if layout == "ref-swin":
        _check_rel_index(net, sd, decided)
    return Converted(arch, state, acc)


def _target_arch(layout: str, state: dict[str, Tensor], params: dict[str, Any] | None, model: str | None,
                 img_size: int, num_heads: int | None, final_norm: str) -> Arch:
    if model is None and params and params.get("model"):  # our own checkpoint knows its model
        model, img_size = params["model"], img_size or int(params.get("input_size") or 0)
    if model is not None:
        arch = from_registry(model, img_size, final_norm)
        if arch.family != FAMILY[layout]:
            raise ValueError(f"--model {model} is a {arch.family.upper()}, the checkpoint a {FAMILY[layout].upper()}")
        return arch
    if FAMILY[layout] == "vit":
        return vit_from_shapes(state, num_heads, img_size, final_norm)
    return swin_from_shapes(state, img_size)


def _build(arch: Arch) -> torch.nn.Module:
    from localmim.models.encoder_io import create_timm_model

    return create_timm_model(arch.timm_name, num_classes=0, **arch.timm_kwargs)


def _fill_check(net: torch.nn.Module, state: dict[str, Tensor], arch: Arch, final_norm: str, acc: Accounting) -> None:
    """Every target key filled (but the fresh ones), no extra key, shapes equal (ViT pos_embed resampled)."""
    from localmim.models.export import resample_pos_embed

    own = net.state_dict()
    fresh = {"vit": ["fc_norm.weight", "fc_norm.bias"] if final_norm == "fresh" else [],
             "swin": ["norm.weight", "norm.bias"] if final_norm == "fresh" else []}[arch.family]
    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and k not in fresh]
    if extra or missing:
        raise ValueError(f"{arch.timm_name}: source keys it does not have: {_names(extra)}; its keys no source key "
                         f"fills: {_names(missing)}")
    pos = state.get("pos_embed")
    if pos is not None and pos.shape[-1] == own["pos_embed"].shape[-1] and pos.shape != own["pos_embed"].shape:
        old = list(state["pos_embed"].shape)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], net)
        acc.resampled["pos_embed"] = (old, list(state["pos_embed"].shape))
    wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{arch.timm_name}: shapes differ (source vs target): {_names(wrong)}")
    result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys or sorted(result.missing_keys) != sorted(fresh):  # cannot happen after the checks
        raise RuntimeError(f"{arch.timm_name}: load_state_dict disagrees with the accounting: {result}")
    acc.fresh = fresh


def _check_rel_index(net: torch.nn.Module, sd: dict[str, Tensor], decided: dict[str, tuple[str, str | None]]) -> None:
    """The reference stores each block's relative-position index; timm rebuilds it: they must agree."""
    buffers = dict(net.named_buffers())
    for k, (rule, _) in decided.items():
        if rule == REL_INDEX:
            mine = buffers.get(k.removeprefix("encoder."))
            if mine is None or mine.shape != sd[k].shape or not torch.equal(mine.long(), sd[k].long()):
                raise ValueError(f"{k}: the stored relative-position index differs from timm's")


def _names(keys: list[str], shown: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more

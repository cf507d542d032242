"""Exported encoders on disk, for ViT and Swin alike: ``encoder.pt`` (a plain timm state dict, loadable with
``weights_only=True``) next to ``encoder.json`` (``timm_name`` + ``timm_kwargs``, plus provenance). Pre-training
writes them (:func:`write_encoder`), ``localmim import`` too (:func:`write_encoder_files`, from released checkpoints,
:mod:`localmim.models.convert`); every downstream stage reads them (:func:`read_encoder`) and builds a timm model from
them (:func:`build_classifier`, :func:`create_encoder`), always through :func:`create_timm_model`.

``timm_name`` says what the model is (``vit_tiny_patch8_64``: width, patch size, resolution; Swin adds the window);
``timm_kwargs`` carry the whole architecture. Plain timm builds it with ``timm.create_model(timm_name, **kwargs)``
when timm registers that name (the reference sizes), else with the family's class, ``timm.models.VisionTransformer``
or ``timm.models.SwinTransformer`` (``**kwargs``). Older files labelled with a registered name still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from localmim.models.export import export_encoder, load_pretrained_into_timm


def write_encoder(model: nn.Module, out: Path, extra: dict) -> Path:
    """Write ``out/encoder.pt`` + ``out/encoder.json`` (atomically) for a trained LocalMIM/MAE ViT or Swin."""
    from localmim.models.swin import LocalMIMSwin, export_swin_encoder

    if isinstance(model, LocalMIMSwin):
        name, kwargs, state = export_swin_encoder(model)
    else:
        name, kwargs, state = export_encoder(model)
    return write_encoder_files(out, name, kwargs, state, extra)


def write_encoder_files(out: Path, name: str, kwargs: dict[str, Any], state: dict[str, Tensor], extra: dict) -> Path:
    """Write ``(timm_name, timm_kwargs, state_dict)`` as ``out/encoder.pt`` + ``out/encoder.json`` (atomically)."""
    from localmim.utils.io import atomic_torch_save, atomic_write_json

    atomic_torch_save({k: v.contiguous().cpu() for k, v in state.items()}, Path(out) / "encoder.pt")
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    atomic_write_json(Path(out) / "encoder.json", {"timm_name": name, "timm_kwargs": kwargs, **extra})
    return Path(out) / "encoder.pt"


_FAMILY_CLASSES = {"vit_": "VisionTransformer", "swin_": "SwinTransformer"}


def create_timm_model(name: str, head: str = "timm", **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` when timm registers ``name``, else the timm class of its family
    (``vit_*``: ``timm.models.VisionTransformer``, ``swin_*``: ``timm.models.SwinTransformer``) built from
    ``kwargs``, which must then carry the whole architecture (exported ``timm_kwargs`` do).

    ``head``: ``timm`` (the model's own) or ``pool_norm`` (Swin only: mean -> fresh LayerNorm -> linear, method
    §8.2, :func:`localmim.models.swin.use_pool_norm_head`); a classifier's ``model.json`` records which.
    """
    import timm

    if timm.is_model(name):
        net = timm.create_model(name, pretrained=False, **kwargs)
    elif name.startswith(tuple(_FAMILY_CLASSES)):
        net = getattr(timm.models, next(c for p, c in _FAMILY_CLASSES.items() if name.startswith(p)))(**kwargs)
    else:
        raise ValueError(f"{name!r} is neither a timm model name nor a vit_*/swin_* label")
    if head == "pool_norm":
        from localmim.models.swin import use_pool_norm_head

        if not isinstance(net, timm.models.SwinTransformer):
            raise ValueError(f"head 'pool_norm' is for Swin models, not {name!r}")
        return use_pool_norm_head(net)
    if head != "timm":
        raise ValueError(f"head must be 'timm' or 'pool_norm', got {head!r}")
    return net


def classifier_head(name: str) -> str:
    """The classifier head method §8 uses for a model family: ViT ``timm`` (``global_pool='avg'`` + fresh
    ``fc_norm``: mean of the patch tokens -> LayerNorm -> head), Swin ``pool_norm`` (mean -> fresh LayerNorm -> head;
    timm's Swin would normalise each token before pooling)."""
    return "pool_norm" if name.startswith("swin") else "timm"


@dataclass
class EncoderSpec:
    """An exported encoder: the standard timm model that holds it and its weights."""

    timm_name: str
    timm_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def img_size(self) -> int:
        size = self.timm_kwargs.get("img_size", 224)
        return int(size[0] if isinstance(size, list | tuple) else size)


def read_encoder(path: str | Path) -> EncoderSpec:
    """Load an exported encoder: a ``<name>.json`` holding ``timm_name`` (and ``timm_kwargs``) next to
    ``<name>.pt`` (a state dict loadable with ``weights_only=True``). ``path`` is that ``.pt`` file or a
    directory holding one such pair (``encoder.pt`` / ``encoder.json`` preferred)."""
    path = Path(path)
    if path.is_dir():
        metas = sorted(path.glob("*.json"), key=lambda p: (p.stem != "encoder", p.name))
        metas = [m for m in metas if m.with_suffix(".pt").is_file() and "timm_name" in _read_json(m)]
        if not metas:
            raise ValueError(f"{path}: no exported encoder (<name>.json with timm_name + <name>.pt)")
        path = metas[0].with_suffix(".pt")
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise ValueError(f"{path}: expected an exported encoder ({path.name} + {meta.name})")
    info = _read_json(meta)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return EncoderSpec(info["timm_name"], dict(info.get("timm_kwargs", {})), sd)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class ModelSpec(BaseModel):
    """What rebuilds a trained downstream model besides its encoder's architecture, in the vocabulary of the stage's
    params (:mod:`localmim.models.artifact` writes it into ``model.json``). ``task`` names the kind of model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: ClassVar[str]

    @classmethod
    def from_config(cls, cfg: Any, **given: Any):
        """The spec of the stage params ``cfg``: every field read from the param of the same name, but ``given``."""
        return cls(**({k: getattr(cfg, k) for k in cls.model_fields if k not in given} | given))


class ClassifierSpec(ModelSpec):
    """A classifier (method §8): ``create_timm_model(timm_name, head, **timm_kwargs)``, which is plain timm for
    ``head == 'timm'`` (ViT); Swin's ``pool_norm`` head swaps timm's per-token norm for a pooled one (method §8.2).
    ``timm_kwargs`` hold the whole architecture, ``num_classes`` and ``img_size`` included."""

    task: ClassVar[str] = "classify"
    timm_name: str
    head: Literal["timm", "pool_norm"] = "timm"
    timm_kwargs: dict[str, Any]

    @classmethod
    def of(cls, enc: EncoderSpec, num_classes: int, *, model: str = "auto", input_size: int = 0) -> ClassifierSpec:
        """The classifier on ``enc``: timm model ``model`` (``auto``: the encoder's), ``global_pool='avg'``, the
        :func:`classifier_head` of its family, at ``input_size`` (0: the pre-training resolution)."""
        name = enc.timm_name if model == "auto" else model
        kwargs = dict(enc.timm_kwargs) | {"img_size": input_size or enc.img_size, "global_pool": "avg",
                                          "num_classes": num_classes}
        return cls(timm_name=name, head=classifier_head(name), timm_kwargs=kwargs)

    @property
    def num_classes(self) -> int:
        return int(self.timm_kwargs["num_classes"])

    def build(self, **timm_overrides: Any) -> nn.Module:
        """The untrained classifier (``timm_overrides``: e.g. ``drop_path_rate``, which does not change weights)."""
        return create_timm_model(self.timm_name, self.head, **(self.timm_kwargs | timm_overrides))


def build_classifier(
    enc: EncoderSpec,
    num_classes: int,
    *,
    model: str = "auto",
    drop_path: float = 0.0,
    input_size: int = 0,
    head_init_std: float = 2e-5,
) -> torch.nn.Module:
    """The :meth:`ClassifierSpec.of` classifier (timm, ``global_pool='avg'``, the :func:`classifier_head` of its
    family), encoder weights loaded (method §8.2), fresh head.

    The position embedding is interpolated bicubically (cls slot kept) when ``input_size`` differs from
    the pre-training resolution (method §14.3); ``input_size=0`` keeps the pre-training resolution.
    """
    from timm.layers import trunc_normal_

    net = ClassifierSpec.of(enc, num_classes, model=model, input_size=input_size).build(drop_path_rate=drop_path)
    load_pretrained_into_timm(net, enc.state_dict)
    head = net.get_classifier()
    trunc_normal_(head.weight, std=head_init_std)
    torch.nn.init.zeros_(head.bias)
    return net


def create_encoder(enc: EncoderSpec, *, input_size: int = 0, drop_path: float = 0.0, **timm_overrides) -> nn.Module:
    """The exported encoder as a headless timm model (``num_classes=0``), weights loaded, position embedding
    resampled to ``input_size`` (ViT; 0 keeps the pre-training size). For dense-task backbones."""

    kwargs = {k: v for k, v in enc.timm_kwargs.items() if k not in ("num_classes", "global_pool")}
    if input_size:
        kwargs["img_size"] = input_size
    net = create_timm_model(enc.timm_name, num_classes=0, drop_path_rate=drop_path, **{**kwargs, **timm_overrides})
    _, unexpected = load_pretrained_into_timm(net, enc.state_dict)
    if unexpected:
        raise ValueError(f"encoder weights have keys unknown to {enc.timm_name}: {unexpected[:5]}")
    return net


def create_timm_encoder(source: nn.Module | tuple[str, dict[str, Any], dict[str, Tensor]], num_classes: int = 0,
                        head_init_std: float = 2e-5, **timm_overrides) -> nn.Module:
    """Build a timm ViT initialised from a LocalMIMViT (or from :func:`export_encoder`'s output).

    Args:
        source: the pre-trained model, or ``(name, kwargs, state_dict)`` from :func:`export_encoder`.
        num_classes: classifier classes (0: no head).
        head_init_std: truncated-normal std of a new head, zero bias (method §8: 2e-5).
        **timm_overrides: extra/overriding timm kwargs, e.g. ``img_size=96``, ``drop_path_rate=0.1``.

    Raises:
        RuntimeError: if the state dict has keys the timm model does not know.
    """
    name, kwargs, state = export_encoder(source) if not isinstance(source, tuple) else source
    model = create_timm_model(name, num_classes=num_classes, **{**kwargs, **timm_overrides})
    if num_classes > 0:
        nn.init.trunc_normal_(model.head.weight, std=head_init_std)
        nn.init.zeros_(model.head.bias)
    _, unexpected = load_pretrained_into_timm(model, state)
    if unexpected:
        raise RuntimeError(f"exported state dict has keys unknown to {name}: {unexpected}")
    return model


def build_pretrain_model(cfg) -> nn.Module:
    """The pre-training model ``cfg`` (a ``PretrainConfig``) names: ``localmim.models.create(cfg.model, ...)``, checked
    against ``cfg.mode``; timm attention fused per ``cfg.fused_attn`` (``auto``: timm's default; timm reads the flag
    when a block is built)."""
    import timm.layers

    from localmim.models import create

    before = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(before if cfg.fused_attn == "auto" else cfg.fused_attn == "on")
    try:
        model = create(cfg.model, **cfg.model_overrides())
    finally:
        timm.layers.set_fused_attn(before)
    if cfg.mode != "auto" and model.mode != cfg.mode:
        raise ValueError(f"pretrain.mode={cfg.mode!r} but model {cfg.model!r} is a {model.mode!r} model")
    return model


def load_pretrain_model(checkpoint: str | Path, device: torch.device) -> nn.Module:
    """The pre-training model (encoder + decoders) of a ``pretrain`` checkpoint, rebuilt from the params it stores
    (``weights_only`` load), in eval mode on ``device``."""
    from localmim.config.pretrain import PretrainConfig
    from localmim.runtime import checkpoint as ckpt

    payload = ckpt.load(checkpoint)
    model = build_pretrain_model(PretrainConfig.model_validate(payload["params"]))
    model.load_state_dict(payload["model"])
    return model.to(device).eval()

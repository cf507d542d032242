"""A trained downstream model on disk, one contract for the classifier (``finetune``), the segmenter (``segment``)
and the detector (``detect``): a plain state dict (``model.pt`` by default; ``torch.load(..., weights_only=True)``)
next to ``model.json``::

    {"format": "localmim-model/1",            # this contract, versioned
     "task": "classify" | "segment" | "detect",
     "weights": "model.pt",                   # the state dict file, in the same directory
     "other_weights": [],                     # more state dicts of the same model (a classifier's last.pt)
     "spec": {...},                           # ClassifierSpec | SegmenterSpec | DetectorSpec, in the params' names
     "encoder": {"timm_name": ..., "timm_kwargs": {...}} | null,  # the backbone's architecture (segment, detect)
     "info": {...}}                           # what the stage adds: best epoch, label mapping, ...

:func:`save_model` writes both (atomically; ``model.json`` last, so a directory with a ``model.json`` holds the
weights it names) after checking that the model the files describe takes the weights; :func:`load_model` rebuilds
the model from the spec (encoder randomly initialised, then every weight loaded) and returns it with its spec. A
classifier's spec alone is a plain timm model for ViT (``timm.create_model(timm_name, **timm_kwargs)``, or the
family's class for a name timm does not register); the segmenter and the detector need this package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from localmim.models.detection import DetectorSpec, build_mask_rcnn
from localmim.models.encoder_io import ClassifierSpec, EncoderSpec, ModelSpec
from localmim.models.segmentation import SegmenterSpec, build_segmenter

FORMAT = "localmim-model"
VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "model.pt"
SPECS: dict[str, type[ModelSpec]] = {s.task: s for s in (ClassifierSpec, SegmenterSpec, DetectorSpec)}


class ModelArtifactError(ValueError):
    """A saved model that cannot be written or read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ModelCard:
    """``model.json``, validated."""

    task: str
    spec: ModelSpec
    weights: str = WEIGHTS
    encoder: dict[str, Any] | None = None  # {"timm_name", "timm_kwargs"}
    info: dict[str, Any] = field(default_factory=dict)
    other_weights: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": f"{FORMAT}/{VERSION}", "task": self.task, "weights": self.weights,
                "other_weights": self.other_weights, "spec": self.spec.model_dump(mode="json"),
                "encoder": self.encoder, "info": self.info}

    def build(self) -> nn.Module:
        """The untrained model this card describes (the encoder randomly initialised, no weights loaded), drawn
        without touching the caller's random state."""
        with torch.random.fork_rng(devices=[]):
            if isinstance(self.spec, ClassifierSpec):
                return self.spec.build()
            enc = EncoderSpec(self.encoder["timm_name"], dict(self.encoder["timm_kwargs"]), {})
            if isinstance(self.spec, SegmenterSpec):
                return build_segmenter(enc, self.spec, pretrained=False)
            return build_mask_rcnn(enc, self.spec, pretrained=False)


StateDict = Mapping[str, torch.Tensor]


def save_model(out_dir: str | Path, weights: nn.Module | StateDict, spec: ModelSpec, *,
               encoder: EncoderSpec | None = None, info: dict[str, Any] | None = None, weights_file: str = WEIGHTS,
               other_weights: Mapping[str, StateDict] | None = None) -> Path:
    """Write ``weights`` (a model or its state dict) to ``out_dir/weights_file`` and ``out_dir/model.json``
    (module docstring); ``encoder``: the encoder the model was built on (required for ``segment`` / ``detect``);
    ``other_weights``: more state dicts of the same model by file name. Refused before anything is written when
    the model ``model.json`` describes does not take every state dict."""
    from localmim.utils.io import atomic_torch_save, atomic_write_json

    out = Path(out_dir)
    states = {weights_file: weights.state_dict() if isinstance(weights, nn.Module) else weights,
              **(other_weights or {})}
    states = {f: {k: v.detach().cpu().contiguous() for k, v in sd.items()} for f, sd in states.items()}
    arch = None if encoder is None else {"timm_name": encoder.timm_name, "timm_kwargs": _jsonable(encoder.timm_kwargs)}
    card_json = ModelCard(spec.task, spec, weights_file, arch, dict(info or {}), list(other_weights or {})).to_json()
    card = _parse(json.loads(json.dumps(card_json)), out / MODEL_JSON)  # what load_model will read back
    with torch.device("meta"):  # names and shapes only, nothing allocated
        model = card.build()
    for name, state in states.items():
        _check_fit(model, state, f"{out / name} (not written)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_JSON).unlink(missing_ok=True)  # never an old model.json next to new weights
    for name, state in states.items():
        atomic_torch_save(state, out / name)
    atomic_write_json(out / MODEL_JSON, card_json)
    return out / MODEL_JSON


def read_card(path: str | Path, task: str | None = None) -> ModelCard:
    """``model.json`` of the saved model ``path`` (its directory or the file), validated; ``task``: the kind of
    model expected."""
    path = Path(path)
    file = path / MODEL_JSON if path.is_dir() else path
    if not file.is_file():
        raise ModelArtifactError(f"{path}: no {MODEL_JSON} (not a saved model: the finetune, segment or detect "
                                 "stage's output directory)")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelArtifactError(f"{file}: unreadable ({e})") from None
    card = _parse(data, file)
    if task is not None and card.task != task:
        raise ModelArtifactError(f"{file}: a {card.task} model, expected a {task} model")
    return card


def load_model(path: str | Path, *, task: str | None = None, weights: str | None = None) -> tuple[nn.Module, ModelSpec]:
    """The saved model ``path`` (directory or its ``model.json``) rebuilt from its spec with its weights loaded
    (``weights``: another state dict file of the directory, e.g. a classifier's ``last.pt``), in eval mode on the
    CPU, and its spec. ``task``: refuse any other kind of model."""
    path = Path(path)
    card = read_card(path, task)
    file = (path if path.is_dir() else path.parent) / (weights or card.weights)
    if not file.is_file():
        raise ModelArtifactError(f"{file}: missing (the weights of {file.parent / MODEL_JSON})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle / zip / weights_only errors: all mean "not a state dict file"
        raise ModelArtifactError(f"{file}: not a state dict loadable with weights_only=True "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelArtifactError(f"{file}: not a state dict (name -> tensor), got {type(state).__name__}")
    model = card.build()
    _fit(model, state, str(file))
    return model.eval(), card.spec


def _parse(data: Any, file: Path) -> ModelCard:
    """Validate a ``model.json`` tree: format and version, task, spec (pydantic: one line per wrong key), encoder."""
    if not isinstance(data, dict):
        raise ModelArtifactError(f"{file}: expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    m = re.fullmatch(rf"{FORMAT}/(\d+)", fmt) if isinstance(fmt, str) else None
    if m is None:
        raise ModelArtifactError(f"{file}: format {fmt!r} is not {FORMAT}/<version> (written before the model "
                                 "contract, or not a localmim model: rerun the stage that wrote it)")
    if int(m.group(1)) != VERSION:
        raise ModelArtifactError(f"{file}: format version {m.group(1)}; this localmim reads version {VERSION}")
    task = data.get("task")
    if task not in SPECS:
        raise ModelArtifactError(f"{file}: task {task!r} is not one of {', '.join(SPECS)}")
    try:
        spec = SPECS[task].model_validate(data.get("spec"))
    except ValidationError as e:
        wrong = "; ".join(f"spec{''.join(f'.{x}' for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ModelArtifactError(f"{file}: {wrong}") from None
    encoder = data.get("encoder")
    if task != "classify" and not (isinstance(encoder, dict) and isinstance(encoder.get("timm_name"), str)
                                   and isinstance(encoder.get("timm_kwargs"), dict)):
        raise ModelArtifactError(f"{file}: a {task} model needs 'encoder': {{'timm_name', 'timm_kwargs'}}, "
                                 f"got {encoder!r}")
    files = [data.get("weights", WEIGHTS), *(data.get("other_weights") or [])]
    for name in files:
        if not isinstance(name, str) or not name or Path(name).name != name or name == MODEL_JSON:
            raise ModelArtifactError(f"{file}: weights must be file names next to it, got {name!r}")
    return ModelCard(task, spec, files[0], encoder, dict(data.get("info") or {}), files[1:])


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model`` (all of it, nothing else), or say which weights do not fit."""
    _check_fit(model, state, where)
    model.load_state_dict(state)


def _check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise naming the weights that do not fit ``model``: missing, unexpected, other shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{what} {len(keys)}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if keys]
    if problems:
        raise ModelArtifactError(f"{where}: the weights do not fit the model {MODEL_JSON} describes: "
                                 + "; ".join(problems))


def _jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


__all__ = ["MODEL_JSON", "SPECS", "ModelArtifactError", "ModelCard", "load_model", "read_card", "save_model"]

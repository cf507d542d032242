"""Typed, validated stage parameters loaded from ``params.yaml``.

Every stage has one pydantic model (a *section*), named like the top-level key of ``params.yaml``.
Overrides use the ``dvc exp run -S`` syntax: ``key.path=value`` with the value parsed as YAML.
Validation happens before any work; the first problem is reported as one line naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The field types the sections share.
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNeg = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Prob = Annotated[float, Field(ge=0, le=1)]
Frac = Annotated[float, Field(gt=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
Betas = tuple[Beta, Beta]  # AdamW (beta1, beta2)
Device = Literal["auto", "cpu", "cuda"]
Amp = Literal["auto", "bf16", "fp16", "none"]  # CUDA auto: bf16 where supported, else fp16 + GradScaler; CPU: fp32


class ParamsError(ValueError):
    """A params file, key or value is wrong; the message names the file/key and the problem."""


class Section(BaseModel):
    """Base for stage configs: unknown keys are errors, assignments are validated.

    The schedule checks every training section needs are written here once (:meth:`_check_schedule`): a warm-up
    within the run (``warmup_epochs <= epochs``, ``warmup_iters <= iters``), an lr given (``lr`` or ``blr``) and
    ``min_lr <= lr``; they apply to whichever of those keys a section has.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # Keys that change how a run executes but not what it computes (a resume may differ in them): run_key() drops them.
    runtime_keys: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def params_hash(self) -> str:
        """Short stable hash of the resolved section (tagged on MLflow runs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def run_key(self) -> dict[str, Any]:
        """The params that define what a training run computes (a checkpoint resumes only under the same)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.runtime_keys}

    @model_validator(mode="after")
    def _check_schedule(self):
        d = self.__dict__
        for warm, total in (("warmup_epochs", "epochs"), ("warmup_iters", "iters")):
            if warm in d and total in d and d[warm] > d[total]:
                raise ValueError(f"{warm}={d[warm]} exceeds {total}={d[total]}")
        if "blr" in d and "lr" in d and d["lr"] is None and d["blr"] is None:
            raise ValueError("set lr (absolute) or blr (lr = blr * effective batch / 256)")
        if "min_lr" in d and d.get("lr") is not None and d["min_lr"] > d["lr"]:
            raise ValueError(f"min_lr={d['min_lr']} exceeds lr={d['lr']}")
        return self


class GlobalBatch:
    """Mixin of sections whose recipe is a global batch (method §7, §8; MAE's rule: keep the effective batch fixed).

    ``global_batch`` defines the optimisation: the lr (``blr × global_batch / 256`` unless ``lr`` is set), the number
    of optimizer steps and what each step averages. The per-device ``batch_size`` (a memory knob) and the world size
    only decide the gradient accumulation, ``accum_for(world) = global_batch / (batch_size × world)``, so the same
    params give the same optimisation on 1, 2, 8 or 64 GPUs.
    """

    def accum_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step on ``world_size`` processes.

        Raises:
            ValueError: ``global_batch`` is not a multiple of ``batch_size × world_size`` (the message names the three).
        """
        per_step = self.batch_size * world_size
        if self.global_batch % per_step:
            raise ValueError(f"global_batch={self.global_batch} is not a multiple of batch_size={self.batch_size} x "
                             f"world_size={world_size} (= {per_step}): choose a batch_size that divides "
                             f"global_batch / world_size = {self.global_batch / world_size:g}")
        return self.global_batch // per_step

    def peak_lr(self) -> float:
        """Absolute peak lr: ``lr`` if set, else ``blr × global_batch / 256`` (method §7)."""
        if self.lr is not None:
            return self.lr
        return self.blr * self.global_batch / 256

    @model_validator(mode="before")
    @classmethod
    def _accum_iter_is_derived(cls, data: Any) -> Any:
        if isinstance(data, dict) and "accum_iter" in data:
            raise ValueError("accum_iter: derived now, not set: give global_batch (= batch_size x accum_iter x GPUs "
                             "of the old recipe); accumulation = global_batch / (batch_size x world size)")
        return data

    @model_validator(mode="after")
    def _check_planned_world(self):
        """The world the params plan for (``nnodes × nproc_per_node`` where the section has them) must divide."""
        nproc, nnodes = getattr(self, "nproc_per_node", 1), getattr(self, "nnodes", 1)
        try:
            self.accum_for(nproc * nnodes)
        except ValueError as e:
            raise ValueError(f"{e} (world size = nnodes={nnodes} x nproc_per_node={nproc})") from None
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r}: expected key.path=value (as in `dvc exp run -S`)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ParamsError(f"override {text!r}: empty component in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"override {text!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``key.path=value`` override applied (new keys are allowed here;
    the section model rejects unknown ones with the key's full path)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ParamsError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return tree


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML params file into a dict, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of stage sections, got {type(data).__name__}")
    return data


def _format_validation_error(section: str, err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in (section, *first["loc"]))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    show_got = got is not None and first["type"] != "extra_forbidden" and not isinstance(got, dict)
    extra = f" (got {got!r})" if show_got else ""
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{extra}{more}"


def validate_section(name: str, cls: type[Section], data: Any, source: str = "params") -> Section:
    """Validate ``data`` as section ``name``; raise ParamsError naming the offending key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: {name}: must be a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_validation_error(name, e, source)) from None


def load_section(
    name: str, cls: type[Section], params_file: str | Path = "params.yaml", overrides: list[str] | None = None
) -> Section:
    """Load, override and validate one stage section from a params file.

    Overrides for other sections are applied too (so a shared ``--set`` list works), but only
    ``name`` is validated here; ``localmim params check`` validates every section.
    """
    tree = apply_overrides(read_params_file(params_file), overrides or [])
    return validate_section(name, cls, tree.get(name), source=str(params_file))

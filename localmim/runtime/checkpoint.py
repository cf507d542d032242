"""Self-describing, atomic, auto-resumable training checkpoints.

A checkpoint is one ``torch.save``d dict that loads with ``torch.load(weights_only=True)``: tensors, dicts,
lists, strings and numbers only (RNG states are converted to tensors/ints). Keys:

``format``, ``model`` (state dict of the unwrapped module), ``optimizer``, ``scaler`` (or None), ``epoch``
(the epoch in progress), ``step`` (global iteration), ``data`` (data position: ``{"epoch", "batches"}`` consumed
in that epoch), ``rng`` (one entry per rank: torch, cuda, numpy, python), ``params`` (resolved params),
``identity`` (what makes it resumable: :func:`localmim.train.engine.run_identity`), ``git_commit``, ``extra`` (caller
data), ``time``.

Files are ``ckpt-<step>.pt`` in a run's checkpoint directory, written via a temp file + rename, so a crash
mid-save leaves the previous checkpoint intact; the newest ``keep`` are kept.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localmim.utils.gitinfo import git_commit
from localmim.utils.io import atomic_torch_save, clean_stale_tmp

FORMAT = "localmim-checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, NumPy global, Python) as weights_only-safe values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss": py_state[2],
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, gathered (a collective: call it on all ranks)."""
    from localmim.runtime.distributed import get_world_size

    mine = rng_state()
    if get_world_size() == 1:
        return [mine]
    import torch.distributed as dist

    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, mine)
    return out


def make_payload(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: Any | None,
    epoch: int,
    step: int,
    data_batches: int,
    rng: list[dict[str, Any]],
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a checkpoint dict (see module docstring)."""
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "step": int(step),
        "data": {"epoch": int(epoch), "batches": int(data_batches)},
        "rng": rng,
        "params": params,
        "identity": identity,
        "git_commit": git_commit(),
        "extra": extra or {},
        "time": time.time(),
    }


def save(ckpt_dir: str | Path, payload: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``ckpt-<step>.pt`` and prune all but the newest ``keep`` checkpoints."""
    if keep < 1:
        raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"ckpt-{payload['step']:09d}.pt"
    atomic_torch_save(payload, path)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files in ``ckpt_dir``, oldest (lowest step) first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``ckpt_dir`` (stale temp files from a killed save are removed first)."""
    clean_stale_tmp(ckpt_dir)
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its format tag."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    return payload


def restore(
    payload: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Load model/optimizer/scaler state and this rank's RNG state (when the world size is unchanged)."""
    model.load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    if len(payload["rng"]) == world_size:
        set_rng_state(payload["rng"][rank])

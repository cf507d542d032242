"""Reading ``dvc.lock`` as DVC reads it: its stages, and the params each stage was recorded with as dotted leaves.
Used by ``localmim pull`` (which stages DVC restored, with which params) and by ``localmim compare`` / ``report``
without MLflow runs (the workspace's recorded params)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PARAMS = "params.yaml"


class YAMLError(ValueError):
    """dvc.lock or params.yaml cannot be read (the message names the file)."""


def leaves(key: str, value: Any) -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf below params key ``key`` (a non-empty mapping is not a leaf)."""
    if isinstance(value, dict) and value:
        return {k: v for sub, val in value.items() for k, v in leaves(f"{key}.{sub}", val).items()}
    return {key: value}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The tree of ``{dotted key: value}`` leaves (the inverse of :func:`leaves`)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def read_yaml12(path: Path) -> dict[str, Any]:
    """``path`` read as DVC reads it (YAML 1.2: DVC writes ``1e-06`` to dvc.lock, a string to YAML 1.1 readers)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError as RuamelError

    try:
        tree = YAML(typ="safe", pure=True).load(path.read_text())
    except RuamelError as e:
        raise YAMLError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if tree is not None and not isinstance(tree, dict):
        raise YAMLError(f"{path}: expected a mapping at the top, found {type(tree).__name__}")
    return tree or {}


def read_lock(path: Path = Path("dvc.lock")) -> dict[str, Any]:
    """The stages of ``dvc.lock`` (name -> entry)."""
    stages = read_yaml12(path).get("stages") or {}
    if not isinstance(stages, dict):
        raise YAMLError(f"{path}: stages: expected a mapping of stage names, found {type(stages).__name__}")
    return stages


def lock_leaves(lock_stage: dict[str, Any], params_file: str = PARAMS) -> dict[str, Any]:
    """The params a stage of dvc.lock was recorded with, as dotted leaves."""
    params = (lock_stage.get("params") or {}).get(params_file) or {}
    return {k: v for key, value in params.items() for k, v in leaves(key, value).items()}



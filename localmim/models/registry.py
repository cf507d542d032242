"""Name -> factory registry for pre-training models (ViT and Swin LocalMIM, MAE baselines)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name``.

    Args:
        name: unique model name, e.g. ``"localmim_vit_base_patch16"``.

    Raises:
        ValueError: if the name is already taken by a different factory.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != fn.__qualname__:
            raise ValueError(f"model name {name!r} is already registered by {known.__module__}.{known.__qualname__}")
        _REGISTRY[name] = fn
        return fn

    return deco


def register_variant(name: str, cls: Callable[..., nn.Module], base: dict) -> Callable[..., nn.Module]:
    """Register ``name`` as the factory ``cls(**{**base, **overrides})`` (a named architecture + recipe variant)."""

    def factory(**overrides) -> nn.Module:
        return cls(**{**base, **overrides})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name}: {base} (keyword overrides allowed)."
    return register(name)(factory)


def _load_builtin() -> None:
    # Factories register on import; importing here keeps registry.py free of model imports at load time.
    for mod in ("vit", "swin"):
        if importlib.util.find_spec(f"localmim.models.{mod}") is not None:
            importlib.import_module(f"localmim.models.{mod}")


def create(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``, passing keyword ``overrides`` (e.g. ``img_size=64``) to its factory.

    Raises:
        ValueError: unknown name (the message lists the known names).
    """
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**overrides)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    _load_builtin()
    return sorted(_REGISTRY)

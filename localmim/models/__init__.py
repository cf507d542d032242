"""LocalMIM pre-training models (pure torch + timm): ViT/Swin LocalMIM, MAE baselines, registry, encoder export.

``create(name, **overrides)`` builds a registered model (``list_models()`` names them); ``LocalMIMViT`` is the
columnar model (``localmim.models.vit``); ``localmim.models.export`` turns its encoder into a plain timm ViT.
"""

from localmim.models.registry import create, list_models, register
from localmim.models.swin import LocalMIMSwin as LocalMIMSwin  # registers the Swin names
from localmim.models.vit import LocalMIMViT

__all__ = ["LocalMIMViT", "create", "list_models", "register"]

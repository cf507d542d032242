"""LocalMIM pre-training models (pure torch + timm): ViT/Swin LocalMIM, MAE baselines, registry, encoder export."""

from localmim.models.registry import create, list_models, register

__all__ = ["create", "list_models", "register"]

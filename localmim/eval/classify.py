"""Top-k classification accuracy and mean cross-entropy with torchmetrics, reduced over data-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from localmim.runtime.precision import autocast


def classification_metrics(num_classes: int, device: torch.device, ks: tuple[int, ...] = (1, 5)) -> dict:
    """``top{k}`` (torchmetrics micro ``MulticlassAccuracy``, k capped at ``num_classes``), ``loss`` (mean per-sample
    CE) and ``n`` (sample count), in float64 so ``100 * top1`` is exactly ``100 * correct / n``.

    Argument checks and NaN filtering are off: they read values on the host, which would sync every batch. Under
    DDP ``compute()`` sums the states over ranks (torchmetrics' default ``sync_on_compute``).
    """
    from torchmetrics.aggregation import MeanMetric, SumMetric
    from torchmetrics.classification import MulticlassAccuracy

    ms = {f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro", validate_args=False)
          for k in ks}
    ms |= {"loss": MeanMetric(nan_strategy="disable"), "n": SumMetric(nan_strategy="disable")}
    return {name: m.to(device).set_dtype(torch.float64) for name, m in ms.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over every batch, all ranks together.

    States stay on the device until ``compute`` (one host sync per evaluation). Under DDP every rank must call
    this (``compute`` is collective); each sample is expected on exactly one rank. ``num_classes`` (default: the
    logits' width) lets a rank that got no batch still join the reduction.
    """
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    metrics = None if num_classes is None else classification_metrics(num_classes, device)
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()  # [B, C]
        metrics = metrics or classification_metrics(logits.shape[1], device)
        for k in ("top1", "top5"):
            metrics[k].update(logits, labels)
        metrics["loss"].update(F.cross_entropy(logits, labels, reduction="none"))  # [B]
        metrics["n"].update(torch.full((), labels.numel(), dtype=torch.float64, device=device))
    if was_training and isinstance(model, torch.nn.Module):
        model.train()
    if metrics is None:
        raise ValueError("evaluate: no samples (and num_classes not given)")
    top1, top5, loss, n = (metrics[k].compute().item() for k in ("top1", "top5", "loss", "n"))
    if n == 0:
        raise ValueError("evaluate: no samples")
    return {"top1": 100.0 * top1, "top5": 100.0 * top5, "loss": loss, "n": int(n)}

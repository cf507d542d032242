"""Top-k classification accuracy by exact counting, summed over data-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from localmim.utils.distributed import get_world_size


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k in ``ks`` (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = pred.eq(labels[:, None])  # [B, kmax]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks])  # [len(ks)]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over every batch, all ranks together.

    Counts stay on the device until the end (one host sync per evaluation). Under DDP every rank must
    call this (the sums are all-reduced); each sample is expected on exactly one rank.
    """
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        sums[:2] += topk_correct(logits, labels, (1, 5))
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
    if get_world_size() > 1:
        torch.distributed.all_reduce(sums)
    if was_training and isinstance(model, torch.nn.Module):
        model.train()
    c1, c5, loss, n = sums.tolist()
    if n == 0:
        raise ValueError("evaluate: no samples")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "n": int(n)}

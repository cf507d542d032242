"""Weighted k-nearest-neighbour classification of frozen features (the InstDisc / DINO monitor).

Every query takes its ``k`` most cosine-similar bank features; neighbour ``j`` votes for its label with weight
``exp(s_j / T)`` (``s_j`` the cosine similarity, ``T`` the temperature); the prediction is the class with the
largest summed vote. Defaults ``k = 20``, ``T = 0.07`` are the values of InstDisc and DINO. Pure torch, no
gradients; the bank and the queries stay on their device, and queries are processed in chunks so the similarity
matrix never exceeds ``chunk x N_bank``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, *,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[Q, C]`` (summed ``exp(cos / T)`` votes of the ``k`` nearest bank features) of every query.

    Args:
        bank: ``[N, d]`` labelled features; bank_labels: ``[N]`` int64 in ``[0, num_classes)``.
        queries: ``[Q, d]`` features to classify.
        k: neighbours per query (capped at ``N``).
        temperature: vote temperature ``T``.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"knn: bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be [N, d], [Q, d]")
    if len(bank) != len(bank_labels) or len(bank) == 0:
        raise ValueError(f"knn: {len(bank)} bank features but {len(bank_labels)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    bank_n = F.normalize(bank.float(), dim=1)  # [N, d]
    k = min(k, len(bank))
    out = []
    for q in queries.float().split(chunk):
        sim = F.normalize(q, dim=1) @ bank_n.T  # [q, N] cosine
        top, idx = sim.topk(k, dim=1)  # [q, k]
        votes = torch.zeros(len(q), num_classes, device=q.device)  # [q, C]
        votes.scatter_add_(1, bank_labels.to(q.device)[idx], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out)  # [Q, C]


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, *, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (percent) of :func:`knn_predict` on labelled queries."""
    scores = knn_predict(bank, bank_labels, queries, num_classes, k=k, temperature=temperature)
    return 100.0 * (scores.argmax(1).cpu() == query_labels.cpu()).double().mean().item()

"""Weighted k-nearest-neighbour classification of frozen features (the InstDisc / DINO monitor).

Every query takes its ``k`` most cosine-similar bank features; neighbour ``j`` votes for its label with weight
``exp(s_j / T)`` (``s_j`` the cosine similarity, ``T`` the temperature); the prediction is the class with the
largest summed vote. Defaults ``k = 20``, ``T = 0.07`` are the values of InstDisc and DINO. Pure torch, no
gradients; the bank and the queries stay on their device, and queries are processed in chunks so the similarity
matrix never exceeds ``chunk x N_bank``. :func:`build_knn_hook` is the pretrain stage's monitor
(``pretrain.knn_every``): the ``on_epoch_end`` callback of ``run_pretrain``, built from the params.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def uint8_eval_transform(size: int):
    """Eval view as uint8 ``[3, S, S]``: resize the shorter side to S/0.875 (bicubic; S above 224: to S), centre
    crop S (the crop of the linear probe's eval transform, kept in uint8 so the model normalises it itself)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(int(size / 0.875) if size <= 224 else size,
                                                   interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size)])


def iter_labelled_uint8(shard_dir, limit: int, size: int, batch_size: int, num_workers: int = 0):
    """The first ``limit`` (0 = all) samples of a labelled shard directory, in shard order (a fixed subset):
    uint8 images ``[B, 3, S, S]`` and labels ``[B]``."""
    from localmim.data.classify import ClassifyShards, make_loader

    ds = ClassifyShards(shard_dir, uint8_eval_transform(size), batch_size=batch_size, train=False)
    seen = 0
    for x, y in make_loader(ds, num_workers):
        if limit and seen >= limit:
            break
        take = len(y) if not limit else min(len(y), limit - seen)
        seen += take
        yield x[:take], y[:take]


@torch.no_grad()
def pooled_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, d]`` features of a LocalMIM/MAE pre-training model (ViT or Swin) on uint8 images: its top tap
    (un-masked, tap LayerNorm applied) averaged over the patch tokens."""
    z = model.forward_features(images)[-1]  # ViT [B, 1+N, d] (cls first); Swin [B, R^2, C]
    return (z[:, 1:] if hasattr(model, "cls_token") else z).float().mean(1)


class KnnMonitor:
    """kNN top-1 of a pre-training model's features during pre-training: bank = the first ``n_train`` samples of
    ``train_dir``, queries = the first ``n_val`` of ``val_dir`` (fixed subsets, re-encoded at every call)."""

    def __init__(self, train_dir, val_dir, *, n_train: int, n_val: int, input_size: int, num_classes: int,
                 k: int = 20, temperature: float = 0.07, batch_size: int = 128):
        self.dirs, self.n = (train_dir, val_dir), (n_train, n_val)
        self.size, self.num_classes, self.k, self.t, self.bs = input_size, num_classes, k, temperature, batch_size

    def _encode(self, model, i: int, device, amp_dtype):
        from localmim.runtime.precision import autocast

        feats, labels = [], []
        for x, y in iter_labelled_uint8(self.dirs[i], self.n[i], self.size, self.bs):
            with autocast(device, amp_dtype):
                feats.append(pooled_features(model, x.to(device, non_blocking=True)))
            labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    def __call__(self, model: torch.nn.Module, amp_dtype: torch.dtype | None = None) -> float:
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            bank, bank_y = self._encode(model, 0, device, amp_dtype)
            q, q_y = self._encode(model, 1, device, amp_dtype)
        finally:
            model.train(was_training)
        return knn_top1(bank, bank_y, q, q_y, self.num_classes, k=self.k, temperature=self.t)


def build_knn_monitor(cfg, train_dir: Path, val_dir: str | None, is_main: bool) -> Callable | None:
    """The pretraining monitor ``fn(epochs_done, model) -> row | None``: after every ``knn_every``-th epoch and the
    last, weighted kNN top-1 of the model's pooled top-tap features, as the row ``{"epoch", "knn_top1",
    "knn_seconds"}`` (the monitor's cost) that the training loop logs and keeps; None on the other epochs. Rank 0
    only (None elsewhere).

    ``val_dir`` None: the ``val`` directory next to ``train_dir``; when that has no shards the monitor is turned
    off with a warning (an explicit ``val_dir`` without shards is an error)."""
    from localmim.data.classify import num_classes_of
    from localmim.runtime.precision import amp_dtype

    if cfg.knn_every == 0 or not is_main:
        return None
    num_classes = num_classes_of(train_dir)
    has_val = lambda d: Path(d).is_dir() and any(Path(d).glob("*.tar"))
    if val_dir is None:
        val_dir = Path(train_dir).parent / "val"
        if not has_val(val_dir):
            print(f"pretrain: kNN monitor off: no val shards at {val_dir} (pass --knn-val)", file=sys.stderr)
            return None
    if not num_classes or not has_val(val_dir):
        raise ValueError(f"pretrain.knn_every={cfg.knn_every} needs labelled shards: {train_dir} (with a manifest) "
                         f"and {val_dir}; set pretrain.knn_every=0 to turn the kNN monitor off")
    monitor = KnnMonitor(train_dir, val_dir, n_train=cfg.knn_train, n_val=cfg.knn_val, input_size=cfg.input_size,
                         num_classes=num_classes, k=cfg.knn_k, temperature=cfg.knn_temperature)

    def after_epoch(epochs_done: int, model) -> dict[str, float] | None:
        if epochs_done % cfg.knn_every and epochs_done != cfg.epochs:
            return None
        t0 = time.perf_counter()
        top1 = monitor(model, amp_dtype(cfg.amp, next(model.parameters()).device))
        row = {"epoch": epochs_done, "knn_top1": top1, "knn_seconds": time.perf_counter() - t0}
        print(f"pretrain: epoch {epochs_done}: kNN top-1 {top1:.2f} ({row['knn_seconds']:.1f}s)", file=sys.stderr,
              flush=True)
        return row

    return after_epoch

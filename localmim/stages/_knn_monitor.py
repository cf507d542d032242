"""The pretrain stage's kNN monitor hook (``pretrain.knn_every``): builds the ``on_epoch_end`` callback of
``run_pretrain`` from the params. Rank 0 only; the other ranks get no callback (the monitor has no collectives)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path


def build_knn_hook(cfg, train_dir: Path, val_dir: str | None, log: Callable[[dict[str, float], int], None],
                   is_main: bool) -> Callable | None:
    """``on_epoch_end``: after every ``knn_every``-th epoch and the last, weighted kNN top-1 of the model's pooled
    top-tap features is logged as ``knn_top1`` (and ``knn_seconds``, the monitor's cost) at step ``epoch_1000x``
    (the x-axis of the pretrain run's other metrics) and returned as a row (``run_pretrain`` keeps the rows in its
    checkpoints: ``PretrainResult.monitor``).

    ``val_dir`` None: the ``val`` directory next to ``train_dir``; when that has no shards the monitor is turned
    off with a warning (an explicit ``val_dir`` without shards is an error)."""
    from localmim.data.classify import num_classes_of
    from localmim.eval.knn import KnnMonitor
    from localmim.utils.distributed import amp_dtype

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

    def on_epoch_end(epoch: int, model) -> dict[str, float] | None:
        if (epoch + 1) % cfg.knn_every and epoch + 1 != cfg.epochs:
            return None
        t0 = time.perf_counter()
        top1 = monitor(model, amp_dtype(cfg.amp, next(model.parameters()).device))
        row = {"epoch": epoch + 1, "knn_top1": top1, "knn_seconds": time.perf_counter() - t0}
        log({k: v for k, v in row.items() if k != "epoch"}, (epoch + 1) * 1000)
        print(f"pretrain: epoch {epoch + 1}: kNN top-1 {top1:.2f} ({row['knn_seconds']:.1f}s)", file=sys.stderr,
              flush=True)
        return row

    return on_epoch_end

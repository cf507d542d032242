"""Masked-image-modeling pre-training (method §7): the LocalMIM (or MAE baseline) method on the training loop.

``run_pretrain(cfg, data_dir, ckpt_dir, log_fn)`` trains a ``localmim.models`` pre-training model and returns it
with summary metrics (:class:`~localmim.train.loop.LoopResult`). The same function serves the ``pretrain`` stage, the
LocalMIM-vs-MAE benchmark and the tests.

* The recipe is the global batch: lr = ``blr × global_batch / 256`` (or ``lr``); each rank accumulates
  ``global_batch / (batch_size × world_size)`` micro-batches per optimizer step; per-iteration warm-up + cosine;
  AdamW (``betas``, method §7: 0.9, 0.95) without decay on norms/biases. An epoch is ``N // global_batch`` steps.
* Masking noise from ``seed + rank`` (method §7); the model is built from ``seed`` on every rank.
* What every loop shares (the step, accumulation, AMP, DDP, the non-finite-loss guard, cadence, checkpoints and
  resume) is :mod:`localmim.train.loop`'s. The data position is the shard reader's
  (:meth:`~localmim.data.shards.stream.ShardLoader.position`), so a run stopped mid-epoch continues at the same
  optimizer step on any number of ranks, no sample of the epoch read twice or skipped. On SIGURG / SIGUSR1 / SIGTERM
  (a cluster time limit or preemption) every rank stops at the next logged optimizer step after a checkpoint and the
  stage exits 75 (:mod:`localmim.runtime.preempt`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from localmim.models.common import set_grad_checkpointing
from localmim.models.encoder_io import build_pretrain_model
from localmim.runtime.distributed import DistInfo, setup, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train import loop
from localmim.train.engine import Checkpoints, Engine, LogFn, NonFiniteLossError, data_fingerprint
from localmim.train.optim import create_adamw
from localmim.train.schedule import WarmupCosine

__all__ = ["NonFiniteLossError", "PretrainMethod", "build_engine", "plan_of", "run_pretrain"]

Monitor = Callable[[int, torch.nn.Module], dict[str, float] | None]  # (epochs done, model) -> row


class PretrainMethod(loop.Method):
    """LocalMIM / MAE on a shard loader (:class:`~localmim.data.pretrain.PretrainLoader` with ``with_index``, or any
    object with ``from_step(epoch, done, position)`` yielding ``(images, meta)`` batches); ``monitor`` is called
    after every epoch (the kNN monitor: it says itself when it is due)."""

    def __init__(self, cfg, eng: Engine, loader, monitor: Monitor | None = None):
        self.cfg, self.eng, self.loader, self.monitor = cfg, eng, loader, monitor

    def batches(self, epoch: int, done: int, position: dict[str, Any] | None):
        return self.loader.from_step(epoch, done, position)

    def loss(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from localmim.data.views import targets_from_finest

        model = self.eng.model
        data = batch[0]
        images, finest = data if isinstance(data, tuple) else (data, None)
        images = images.to(self.eng.device, non_blocking=True)  # uint8 [B, 3, S, S]
        targets = None if finest is None else targets_from_finest(finest.to(self.eng.device, non_blocking=True),
                                                                   model.hog_nbins, model.target_cells)
        loss, per_tap, _ = self.eng.net(images, mask_ratio=self.cfg.mask_ratio, targets=targets)
        return loss, [loss, *(per_tap[n] for n in model.loss_names)]

    def count(self, batch) -> int:
        data = batch[0]
        return (data[0] if isinstance(data, tuple) else data).shape[0]

    def position(self) -> dict[str, Any] | None:
        return self.loader.position()

    def evaluate(self, st: loop.LoopState, final: bool) -> dict[str, float] | None:
        return self.monitor(st.epoch, self.eng.model) if self.monitor is not None else None


def build_engine(cfg, dist: DistInfo) -> Engine:
    """Model (seeded ``cfg.seed``, the same on every rank), AdamW, precision and the DDP / compiled wrapper. Leaves
    the global RNG at ``cfg.seed + rank``, the masking noise seed (method §7)."""
    seed_everything(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = build_pretrain_model(cfg).to(dist.device)
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    opt = create_adamw(model, cfg.peak_lr(), cfg.weight_decay, tuple(cfg.betas), dist.device)
    net = torch.compile(model) if cfg.compile else model
    # Buffers (fixed sin-cos, frozen HOG biases) never change after DDP's initial sync: no per-forward sync.
    net = wrap_ddp(net, dist, forward_sync_buffers=False)
    seed_everything(cfg.seed + dist.rank)  # masking noise: seed + rank (method §7)
    return Engine(model, net, opt, Precision.of(cfg.amp, dist.device), dist)


def plan_of(cfg, steps: int, world: int, taps: list[str], progress: bool = True) -> loop.Plan:
    """The loop plan of a pre-training run of ``steps`` optimizer steps per epoch on ``world`` ranks, the model's
    reconstruction taps named ``taps``."""
    cadence = loop.Cadence.of(cfg, "epoch", eval_every=1)
    return loop.Plan("pretrain", cfg.epochs, steps, ("loss", *(f"loss_{n}" for n in taps)), cfg.accum_for(world),
                     cadence, cfg.seed, eval_at_end=False, progress=progress)


def _check_views(model: torch.nn.Module, data_dir: Path) -> None:
    from localmim.data.pretrain import read_views_manifest

    man = read_views_manifest(data_dir)
    want = {"target": model.target, "input_size": model.img_size}
    if model.target == "hog":
        want.update(hog_nbins=model.hog_nbins, cells=list(model.target_cells))
    bad = {k: (man.get(k), v) for k, v in want.items() if man.get(k) != v}
    if bad:
        detail = ", ".join(f"{k}: views {a} vs model {b}" for k, (a, b) in bad.items())
        raise ValueError(f"{data_dir}: view shards do not match the model ({detail}); re-run `localmim targets`")


def _loader(cfg, data_dir: Path, dist: DistInfo):
    from localmim.data.pretrain import PretrainLoader, PretrainStream

    ds = PretrainStream(data_dir, input_size=cfg.input_size, batch_size=cfg.batch_size, seed=cfg.seed,
                        shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, rank=dist.rank,
                        world=dist.world_size, views=cfg.data == "views", global_batch=cfg.global_batch,
                        with_index=True)
    return PretrainLoader(ds, cfg.num_workers, pin_memory=cfg.pin_memory and dist.device.type == "cuda")


def run_pretrain(cfg, data_dir: str | Path, ckpt_dir: str | Path, log_fn: LogFn | None = None, *,
                 monitor: Monitor | None = None, progress: bool = True,
                 dist: DistInfo | None = None) -> loop.LoopResult:
    """Pre-train per ``cfg`` (a ``PretrainConfig``) on ``data_dir`` (raw train shards, or view shards when
    ``cfg.data == 'views'``), resuming from ``ckpt_dir`` automatically.

    Args:
        cfg: resolved ``pretrain`` params.
        data_dir: shard directory for ``cfg.data``.
        ckpt_dir: checkpoint root (each run uses its own keyed sub-directory).
        log_fn: ``log_fn(metrics, step)`` on rank 0 every ``cfg.log_every`` optimizer steps: ``loss``,
            ``loss_<tap>``, ``lr``, ``epoch``, ``images_per_s`` (end-to-end), ``images_per_s_compute``,
            ``data_wait_frac``, ``peak_mem_mb``; and the monitor's rows.
        monitor: ``fn(epochs_done, model)`` after each epoch on every rank; a row it returns is logged and kept in
            the result's history and in the checkpoints.
        progress: show a progress bar on rank 0.
        dist: the process group the stage started (default: started here from torchrun's environment).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the message names the step and the last good checkpoint).
        ValueError: inconsistent params/data (e.g. view shards built for another model, a global batch that does
            not divide).
    """
    dist = setup(cfg.device, dist)
    cfg.accum_for(dist.world_size)  # refuse a global batch that does not divide before any work
    data_dir = Path(data_dir)
    loader = _loader(cfg, data_dir, dist)
    eng = build_engine(cfg, dist)
    if cfg.data == "views":
        _check_views(eng.model, data_dir)
    ckpts = Checkpoints.of(ckpt_dir, "pretrain", cfg, dist, data=data_fingerprint(data_dir))
    plan = plan_of(cfg, loader.ds.optimizer_steps, dist.world_size, eng.model.loss_names, progress)
    schedule = WarmupCosine(eng.opt, cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
    result = loop.run(PretrainMethod(cfg, eng, loader, monitor), eng, schedule, plan, ckpts=ckpts, log_fn=log_fn)
    result.metrics.update(peak_lr=cfg.peak_lr(), global_batch=cfg.global_batch)
    return result

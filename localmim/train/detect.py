"""Mask R-CNN training loop (method §9.2): AdamW (``betas``) with layer-wise lr decay, per-iteration warm-up + step or
cosine schedule (:class:`~localmim.train.schedule.DetSchedule`), COCO evaluation every ``eval_every`` epochs and at
the end, resumable checkpoints by epochs and minutes. The loop (step, accumulation, AMP, DDP, the non-finite-loss
guard with losses read every ``log_every`` iterations and at each epoch's end, cadence, checkpoints, resume) is
:mod:`localmim.train.loop`'s; the run's identity holds the encoder and the used image/annotation counts, not the
world size.

The recipe is the global batch: an epoch is ``N // global_batch`` optimizer steps (the last partial global batch
dropped), each averaging ``global_batch`` images, every rank accumulating ``global_batch / (batch_size x world)``
micro-batches (torchvision's losses are each micro-batch's own means, as each GPU's are under DDP). The images of a
step come from :class:`localmim.data.dense.samplers.EpochBatches`: a slice of the epoch's permutation (the one
``DistributedSampler(seed)`` draws), the same on any world size, so a run resumes mid-epoch at an optimizer step on
any number of ranks.

The model and the datasets are built here from the checked COCO splits (as ``segment`` builds its own). Determinism:
the model is built from ``seed`` (the same on every rank), the rest draws from ``seed + rank``; augmentation draws
from the loader's workers, seeded from a generator fixed by ``(seed, epoch, rank)`` (and the step resumed at, after a
mid-epoch resume), or from the rank's global RNG (restored from the checkpoint) when ``num_workers = 0``. So a run
resumed on the same world size equals the uninterrupted one on CPU from an epoch checkpoint, and with
``num_workers = 0`` from a mid-epoch one too; the augmentation draws depend on the rank (unlike segment's per-sample
seeds: these keep the embedded results of the per-device sampler this one replaced), the images of a step do not.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from localmim.data.dense.samplers import EpochBatches
from localmim.models.common import set_grad_checkpointing
from localmim.models.layer_decay import param_groups_with_decay
from localmim.runtime.distributed import DistInfo, setup, wrap_ddp
from localmim.runtime.precision import Precision
from localmim.runtime.seed import seed_everything
from localmim.train import loop
from localmim.train.engine import Checkpoints, Engine, LogFn, encoder_fingerprint
from localmim.train.schedule import DetSchedule, StepSchedule

ENCODER_PREFIX = "backbone.body.encoder."
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")  # torchvision's


def _train_loader(ds, cfg, dist: DistInfo, epoch: int, done: int = 0):
    """This rank's micro-batches of ``epoch`` from optimizer step ``done`` on (:class:`EpochBatches`); worker seeds
    fixed by ``(seed, epoch, rank)``, and by ``done`` too after a mid-epoch resume (fresh streams, not the epoch
    start's again)."""
    from torch.utils.data import DataLoader

    from localmim.data.dense.coco import collate

    sampler = EpochBatches(len(ds), cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world_size, done,
                           global_batch=cfg.global_batch)
    key = ((cfg.seed * 1_000_003) + epoch) * 1009 + dist.rank
    gen = torch.Generator().manual_seed(key * 1_000_003 + done if done else key)
    return DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                      pin_memory=dist.device.type == "cuda", generator=gen)


def evaluate(eng: Engine, val_set, gt, label_to_cat, cfg, keep_images: int = 0):
    """COCO metrics of the model on ``val_set`` (each rank predicts a strided share, rank 0 scores all)."""
    from localmim.data.dense.coco import collate
    from localmim.eval.detection import coco_eval, predict
    from localmim.runtime.distributed import broadcast_object

    dist = eng.dist
    share = torch.utils.data.Subset(val_set, list(range(dist.rank, len(val_set), dist.world_size)))
    loader = torch.utils.data.DataLoader(share, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         collate_fn=collate, pin_memory=dist.device.type == "cuda")
    results, kept = predict(eng.model, loader, dist.device, label_to_cat, eng.prec.dtype,
                            keep_images if dist.is_main else 0)
    if dist.distributed:
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics = coco_eval(gt, results) if dist.is_main else {}
    return broadcast_object(metrics), results, kept


def _build(cfg, enc, train, val, dist: DistInfo, skips: dict) -> tuple[Engine, Any, Any]:
    """The detector (from ``seed`` on every rank) in an engine, and the train / val datasets (an image that fails
    to load follows ``skips[split]``: training substitutes the next one, evaluation leaves it out)."""
    from localmim.data.dense.coco import coco_dataset
    from localmim.data.dense.coco_transforms import eval_transforms, train_transforms
    from localmim.models.detection import DetectorSpec, build_mask_rcnn
    from localmim.train.optim import create_adamw

    seed_everything(cfg.seed)  # the same initial model on every rank
    spec = DetectorSpec.from_config(cfg, num_classes=len(train.cat_ids))  # the stage's model.json writes the same
    model = build_mask_rcnn(enc, spec, pretrained=cfg.pretrained)
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    seed_everything(cfg.seed + dist.rank)  # drop path, augmentation (num_workers = 0)
    train_set = coco_dataset(train, train_transforms(train, cfg.augment, cfg.image_size, cfg.scale_range),
                             skips.get("train"), train=True)
    val_set = coco_dataset(val, eval_transforms(val), skips.get("val"))
    model.to(dist.device)
    groups = param_groups_with_decay(model, model.backbone.body.encoder, ENCODER_PREFIX, cfg.weight_decay,
                                     cfg.layer_decay)
    opt = create_adamw(groups, lr=0.0, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), device=dist.device)
    return Engine(model, wrap_ddp(model, dist), opt, Precision.of(cfg.amp, dist.device), dist), train_set, val_set


class DetectMethod(loop.Method):
    """Mask R-CNN on a checked COCO split: this rank's micro-batches of each epoch's global batches, the sum of
    torchvision's losses, COCO box / mask AP on the val split (the final evaluation keeps the results and
    ``vis_images`` pictures: :attr:`results`, :attr:`kept`)."""

    def __init__(self, cfg, eng: Engine, train_set, val_set, gt, label_to_cat):
        self.cfg, self.eng, self.train_set, self.val_set, self.gt = cfg, eng, train_set, val_set, gt
        self.label_to_cat = label_to_cat
        self.results: list[dict[str, Any]] | None = None
        self.kept: list = []

    def batches(self, epoch: int, done: int, position):
        # a mid-epoch resume starts at optimizer step ``done`` (the consumed images are not loaded again)
        return _train_loader(self.train_set, self.cfg, self.eng.dist, epoch, done)

    def loss(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        images, targets = batch
        dev = self.eng.device
        images = [im.to(dev, non_blocking=True) for im in images]  # [3, H, W] each
        targets = [{k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        losses = self.eng.net(images, targets)  # torchvision's dict of the RPN and ROI-head losses
        total = sum(losses.values())
        return total, [total, *(losses[n] for n in LOSS_NAMES)]

    def count(self, batch) -> int:
        return len(batch[0])

    def evaluate(self, st: loop.LoopState, final: bool) -> dict[str, float]:
        keep = self.cfg.vis_images if final else 0
        metrics, results, kept = evaluate(self.eng, self.val_set, self.gt, self.label_to_cat, self.cfg, keep)
        if final:
            self.results, self.kept = results, kept
        return metrics


def run_detect(cfg, enc, train, val, ckpt_dir, *, dist: DistInfo | None = None, log_fn: LogFn | None = None,
               progress: bool = True, skips: dict | None = None) -> loop.LoopResult:
    """Train Mask R-CNN on the exported encoder ``enc`` (an ``EncoderSpec``) on the checked COCO split ``train``
    (a :class:`~localmim.data.dense.coco.CocoSplit`) and evaluate on ``val`` (see the module docstring), resuming this
    run's newest checkpoint under ``ckpt_dir``. ``skips``: ``{split: LoadSkips}``, the load-time rule of each split
    (default: a file that fails to load raises, naming it). The result's ``metrics`` hold the last evaluation (COCO
    AP), ``seconds`` (this call) and the loop's counters; ``state["results"]`` the COCO results of the final
    evaluation, ``state["kept"]`` the (image, output) pairs for the picture."""
    from localmim.data.raw.imagefile import LoadSkips
    from localmim.eval.detection import ScoredGroundTruth

    t0 = time.time()
    dist = setup(cfg.device, dist)
    accum = cfg.accum_for(dist.world_size)  # refuse a global batch that does not divide before any work
    skips = skips or {}
    eng, train_set, val_set = _build(cfg, enc, train, val, dist, skips)
    gt = ScoredGroundTruth(val, skips.get("val") or LoadSkips())  # images that failed to load are not scored
    counts = {s: {"images": r.images_used, "annotations": r.annotations_used}
              for s, r in (("train", train.report), ("val", val.report))}
    ckpts = Checkpoints.of(ckpt_dir, "detect", cfg, dist, encoder=encoder_fingerprint(enc),
                           data=json.dumps(counts, sort_keys=True))
    steps = EpochBatches(len(train_set), cfg.batch_size, cfg.seed, 0, dist.rank, dist.world_size,
                         global_batch=cfg.global_batch).per_epoch  # optimizer steps per epoch (raises: too few images)
    sched = DetSchedule(cfg.lr, steps * cfg.epochs, cfg.warmup_iters, cfg.schedule, tuple(cfg.milestones), cfg.min_lr)
    method = DetectMethod(cfg, eng, train_set, val_set, gt, val.label_to_cat)
    cadence = loop.Cadence.of(cfg, "epoch", eval_every=cfg.eval_every)
    plan = loop.Plan("detect", cfg.epochs, steps, ("loss", *LOSS_NAMES), accum, cadence, cfg.seed,
                     progress=progress and dist.is_main)
    res = loop.run(method, eng, StepSchedule(eng.opt, sched), plan, ckpts=ckpts, log_fn=log_fn)
    if method.results is None:  # resumed after the last evaluation: evaluate the restored weights again
        res.metrics.update(method.evaluate(loop.LoopState(), final=True))
    res.metrics["seconds"] = time.time() - t0
    res.state.update(results=method.results, kept=method.kept)
    return res

"""Linear probing (MAE protocol): frozen encoder, ``BatchNorm1d(affine=False)`` + ``Linear`` head.

The encoder is the standard timm model built from the exported encoder with no classifier
(``num_classes=0``), so its output is the pooled pre-logits feature (mean of the tokens -> fresh LayerNorm,
as in fine-tuning). Features are extracted once per split with the eval transform and cached; the head
is then trained on the cache. Deviation from MAE, for speed: MAE re-encodes RandomResizedCrop + flip views
every epoch; caching un-augmented features makes the probe a cheap signal for comparing pre-training
runs (seconds instead of a full-encoder pass per epoch). Optimizer: LARS as in MAE (timm's ``Lars``,
trust ratio on the weight matrix only, as MAE excludes 1-D params) or SGD / AdamW. Feature extraction autocasts per
``amp`` (bf16 where supported, else fp16; nothing is back-propagated through the encoder, so no loss scaling); the
head trains in fp32 on the cached features, on the training loop (:mod:`localmim.train.loop`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from localmim.models.encoder_io import EncoderSpec
from localmim.runtime.distributed import DistInfo
from localmim.runtime.precision import Precision, autocast
from localmim.runtime.seed import seed_everything
from localmim.train import loop
from localmim.train.engine import Engine, LogFn
from localmim.train.schedule import WarmupCosine


def build_encoder(enc: EncoderSpec, *, model: str = "auto", input_size: int = 0) -> torch.nn.Module:
    """Frozen timm encoder (no head, eval mode) with the exported weights."""
    from localmim.models.encoder_io import classifier_head, create_timm_model
    from localmim.models.export import load_pretrained_into_timm

    kwargs = {k: v for k, v in enc.timm_kwargs.items() if k != "num_classes"}
    if input_size:
        kwargs["img_size"] = input_size
    name = enc.timm_name if model == "auto" else model
    net = create_timm_model(name, classifier_head(name), num_classes=0, **kwargs)  # pre-logits: pooled, then LN
    load_pretrained_into_timm(net, enc.state_dict)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def extract_features(encoder, batches, device: torch.device, amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``[N, d]`` (fp32, on ``device``) and labels ``[N]`` for every batch."""
    feats, labels = [], []
    for images, y in batches:
        with autocast(device, amp_dtype):
            f = encoder(images.to(device, non_blocking=True))  # [B, d]
        feats.append(f.float())
        labels.append(y.to(device, non_blocking=True))
    return torch.cat(feats), torch.cat(labels)


def build_head(dim: int, num_classes: int) -> torch.nn.Module:
    """MAE's probe: BatchNorm without affine parameters, then a linear layer (weight std 0.01, bias 0)."""
    from timm.layers import trunc_normal_

    head = torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6), torch.nn.Linear(dim, num_classes))
    trunc_normal_(head[1].weight, std=0.01)
    torch.nn.init.zeros_(head[1].bias)
    return head


def build_optimizer(head: torch.nn.Module, name: str, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """LARS (MAE; trust ratio on the weight only), SGD with momentum 0.9, or AdamW (``betas``); lr is set by the
    schedule."""
    from timm.optim import Lars

    lin = head[1]
    if name == "lars":
        groups = [{"params": [lin.weight], "weight_decay": weight_decay, "always_adapt": True},
                  {"params": [lin.bias], "weight_decay": 0.0, "always_adapt": False}]
        return Lars(groups, lr=0.0, momentum=0.9)
    if name == "sgd":
        return torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(head.parameters(), lr=0.0, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"linprobe optimizer must be lars|sgd|adamw, got {name!r}")


class ProbeMethod(loop.Method):
    """The probe head on cached features ``x [N, d]`` / ``y [N]``: a fresh permutation every epoch (drawn from a
    generator seeded ``seed``), full global batches (drop last, as MAE), top-1/top-5 on the val features after every
    epoch; keeps the best epoch's head."""

    def __init__(self, cfg, eng: Engine, train_xy: tuple[torch.Tensor, torch.Tensor],
                 val_xy: tuple[torch.Tensor, torch.Tensor]):
        self.cfg, self.eng, (self.x, self.y), self.val = cfg, eng, train_xy, val_xy
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.crit = torch.nn.CrossEntropyLoss()
        self.best, self.best_epoch, self.best_head = -1.0, 0, None

    def batches(self, epoch: int, done: int, position):
        perm = torch.randperm(len(self.x), generator=self.gen).to(self.x.device)
        b = self.cfg.batch_size
        micro = len(self.x) // self.cfg.global_batch * self.cfg.accum_for(1)
        return ((self.x[idx], self.y[idx]) for idx in (perm[i * b:(i + 1) * b] for i in range(micro)))

    def loss(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, y = batch
        loss = self.crit(self.eng.net(x), y)  # [B, d] -> [B, C] logits
        return loss, [loss]

    def count(self, batch) -> int:
        return len(batch[1])

    def evaluate(self, st: loop.LoopState, final: bool) -> dict[str, float]:
        from localmim.eval.classify import evaluate

        ev = evaluate(self.eng.model, [self.val], self.eng.device)
        if ev["top1"] > self.best:
            self.best, self.best_epoch = ev["top1"], st.epoch
            self.best_head = {k: v.detach().cpu().clone() for k, v in self.eng.model.state_dict().items()}
        return {"train_loss": st.summary.get("train_loss", float("nan")), "lr": st.summary.get("lr", 0.0),
                "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "best_top1": self.best}


def train_probe(
    cfg, train_xy: tuple[torch.Tensor, torch.Tensor], val_xy: tuple[torch.Tensor, torch.Tensor], num_classes: int,
    log_fn: LogFn | None = None,
) -> loop.LoopResult:
    """Train the probe head on cached features, evaluating top-1/top-5 on the val features each epoch; the result's
    ``metrics`` hold the last epoch's and the best top-1 (``best_top1``, ``best_epoch``), ``state["head"]`` the best
    epoch's head. One process, fp32, no checkpoints (the head trains in seconds on the cache)."""
    t0 = time.time()
    x = train_xy[0]
    dev = x.device
    seed_everything(cfg.seed)
    head = build_head(x.shape[1], num_classes).to(dev)
    opt = build_optimizer(head, cfg.optimizer, cfg.weight_decay, cfg.betas)
    eng = Engine(head, head, opt, Precision.of("none", dev), DistInfo(0, 1, 0, dev))  # fp32, one process
    steps = len(x) // cfg.global_batch
    if steps < 1:
        raise ValueError(f"linprobe: {len(x)} training features are fewer than global_batch={cfg.global_batch}")
    method = ProbeMethod(cfg, eng, train_xy, val_xy)
    plan = loop.Plan("linprobe", cfg.epochs, steps, ("train_loss",), cfg.accum_for(1),
                     loop.Cadence("epoch", steps, eval_every=1), cfg.seed, progress=False)
    res = loop.run(method, eng, WarmupCosine(opt, cfg.peak_lr(), cfg.min_lr, cfg.warmup_epochs, cfg.epochs), plan,
                   log_fn=log_fn)
    res.metrics.update(best_top1=method.best, best_epoch=method.best_epoch, seconds=time.time() - t0)
    res.state["head"] = method.best_head
    return res


def linprobe(
    cfg, enc: EncoderSpec, *, train_dir: str | Path, val_dir: str | Path, num_classes: int | None = None,
    log_fn: LogFn | None = None,
) -> loop.LoopResult:
    """Extract features of both splits with the frozen encoder, then :func:`train_probe`. Single process."""
    from localmim.data.classify import ClassifyShards, build_transform, make_loader, num_classes_of
    from localmim.runtime.distributed import resolve_device
    from localmim.runtime.precision import amp_dtype

    t0 = time.time()
    dev = resolve_device(cfg.device)
    num_classes = num_classes or num_classes_of(train_dir)
    if not num_classes:
        raise ValueError(f"{train_dir}: class count unknown (no manifest 'classes'); pass num_classes")
    size = cfg.input_size or enc.img_size
    encoder = build_encoder(enc, model=cfg.model, input_size=size).to(dev)
    tf = build_transform(size, train=False)
    amp = amp_dtype(cfg.amp, dev)  # inference only: no loss scaling needed
    xy = []
    for d in (train_dir, val_dir):
        ds = ClassifyShards(d, tf, batch_size=256, train=False)
        xy.append(extract_features(encoder, make_loader(ds, cfg.num_workers, dev.type == "cuda"), dev, amp))
    res = train_probe(cfg, xy[0], xy[1], num_classes, log_fn)
    res.metrics["seconds"] = time.time() - t0
    return res

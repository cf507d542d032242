"""``localmim targets SHARDS OUT``: precomputed views + multi-scale targets ("view shards") for pretraining.

For every training image, ``targets.views`` (K) fixed augmented views (the online augmentation of epochs
0..K-1 for ``targets.seed``), each stored as the uint8 view (PNG), its un-normalised finest-cell HOG (fp16 or
fp32; nothing for pixel targets) and its crop params; see :mod:`localmim.data.views`. Prints the projected
size on disk first; the output directory appears atomically with ``views.json`` (counts, sha256 per shard).
Pretraining reads them with ``pretrain.data: views`` (epoch e -> view e mod K).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from localmim.config.targets import TargetsConfig
from localmim.pipeline.stage import StageContext, flag, stage


def _log(msg: str) -> None:
    print(f"localmim {msg}", file=sys.stderr, flush=True)


@stage(
    "targets",
    section="targets",
    config=TargetsConfig,
    help="precompute K augmented views per training image with their multi-scale targets (view shards)",
    flags=[
        flag("src", help="train shard directory (output of `localmim shard`)"),
        flag("out", help="output directory for the view shards and views.json"),
        flag("--views", key="views", type=int, metavar="K", help="views per image"),
        flag("--seed", key="seed", type=int, metavar="N", help="seed of the views"),
        flag("--dtype", key="dtype", choices=["fp16", "fp32"], help="storage dtype of the HOG histograms"),
        flag("--workers", key="workers", type=int, metavar="N", help="processes computing views"),
        flag("--placeholder-unless-views", action="store_true",
             help="the DAG's node: unless pretrain.data is views, only write a constant placeholder to OUT"),
    ],
)
def run(cfg: TargetsConfig, ctx: StageContext) -> dict[str, float]:
    import torch

    from localmim.data.views import spec_from_model, write_views
    from localmim.models import create

    if ctx.args.placeholder_unless_views and (ctx.params_tree.get("pretrain") or {}).get("data") != "views":
        return _placeholder(Path(ctx.args.out), ctx)
    kw = {"img_size": cfg.input_size} | ({"hog_nbins": cfg.hog_nbins} if cfg.hog_nbins else {})
    with torch.device("meta"):  # only the geometry is needed, not the weights
        model = create(cfg.model, **kw)
    spec = spec_from_model(model, cfg.views, cfg.seed, cfg.dtype)
    out = Path(ctx.args.out)
    t0 = time.time()
    man = write_views(ctx.args.src, out, spec, max_samples_per_shard=cfg.max_samples_per_shard,
                      workers=cfg.workers, log=_log, extra={"model": cfg.model, "params": cfg.to_dict()})
    ctx.dump_params(cfg, out)
    ctx.tracker.log_artifact(out / "views.json")
    seconds = time.time() - t0
    n = man["num_samples"]
    _log(f"targets: {n} images x {spec.views} views, {man['total_bytes'] / 2**20:.1f} MiB in {seconds:.1f}s -> {out}")
    return {"num_samples": n, "views": spec.views, "total_bytes": man["total_bytes"], "seconds": seconds,
            "images_per_s": n * spec.views / max(seconds, 1e-9)}


PLACEHOLDER = {"view_shards": False,
               "reason": "pretrain.data is online: pretraining reads data/shards/train; set pretrain.data: views "
                         "to build view shards here (the DAG's targets node always exists, see "
                         "localmim/pipeline/dag.py)"}


def _placeholder(out: Path, ctx: StageContext) -> dict[str, float]:
    """Replace ``out`` by a directory holding only a constant file (same bytes every time, so DVC sees the same
    output hash and does not rerun pretraining); no targets params are dumped into it for the same reason."""
    import json

    from localmim.utils.io import atomic_write_text, replace_dir, staging_dir

    stage = staging_dir(out)
    atomic_write_text(stage / "PLACEHOLDER.json", json.dumps(PLACEHOLDER, indent=2) + "\n")
    replace_dir(stage, out)
    ctx.tracker.set_tags({"placeholder": "pretrain.data is online"})
    _log(f"targets: pretrain.data is online: no view shards, placeholder -> {out}")
    return {"num_samples": 0, "views": 0}

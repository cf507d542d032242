"""``localmim shard SRC OUT --split train|val``: an ImageFolder tree -> WebDataset tar shards.

Outputs (see :mod:`localmim.data.shards`): ``OUT/<split>-NNNNNN.tar``, timm's ``OUT/_info.json``, the resolved
params ``OUT/<split>.params.yaml`` and, last, the manifest ``OUT/<split>.json``. Read the shards with timm::

    timm.data.create_dataset("wds/localmim", root=OUT, split=SPLIT)

or with :class:`localmim.data.classify.ClassifyShards` (the project's one reader, :mod:`localmim.data.stream`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from localmim.config.shard import ShardConfig
from localmim.pipeline.stage import StageContext, StageError, flag, stage


def _warn(msg: str) -> None:
    print(f"localmim shard: warning: {msg}", file=sys.stderr)


@stage(
    "shard",
    section="shard",
    config=ShardConfig,
    help="pack an ImageFolder tree (class sub-directories) into WebDataset tar shards + manifest",
    flags=[
        flag("src", help="ImageFolder root: one sub-directory per class"),
        flag("out", help="output directory for <split>-NNNNNN.tar, <split>.json and _info.json"),
        flag("--split", required=True, choices=["train", "val"], help="split name (file names and sample keys)"),
        flag("--max-samples-per-shard", key="max_samples_per_shard", type=int, metavar="N", help="samples per shard"),
        flag("--max-shard-bytes", key="max_shard_bytes", type=int, metavar="BYTES", help="shard size limit"),
        flag("--max-side", key="max_side", type=int, metavar="PX", help="downscale the long side to PX (0 = keep)"),
        flag("--max-pixels", key="max_pixels", type=int, metavar="N", help="decompression-bomb limit"),
        flag("--seed", key="seed", type=int, metavar="N", help="seed of the shuffle of samples across shards"),
        flag("--workers", key="workers", type=int, metavar="N", help="decode/verify processes"),
        flag("--on-bad", key="on_bad", choices=["skip", "fail"], help="bad input file: skip it (listed) or fail"),
    ],
    run_name=lambda a: f"shard_{a.split}",
)
def run(cfg: ShardConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.data.shards import BadImageError, ShardOptions, write_shards

    args = ctx.args
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx.dump_params(cfg, out, name=f"{args.split}.params.yaml")
    t0 = time.time()
    try:
        manifest = write_shards(args.src, out, args.split, ShardOptions(**cfg.to_dict()), warn=_warn)
    except (BadImageError, FileNotFoundError, ValueError) as e:
        raise StageError(str(e)) from None
    seconds = time.time() - t0
    ctx.tracker.log_artifact(out / f"{args.split}.json")
    n = manifest["num_samples"]
    print(
        f"localmim shard: {args.split}: {n} samples in {manifest['num_shards']} shards, "
        f"{manifest['num_skipped']} skipped, {seconds:.1f}s -> {out}",
        file=sys.stderr,
    )
    return {
        "num_found": manifest["num_found"],
        "num_samples": n,
        "num_skipped": manifest["num_skipped"],
        "num_shards": manifest["num_shards"],
        "total_bytes": manifest["total_bytes"],
        "seconds": seconds,
        "images_per_s": n / max(seconds, 1e-9),
    }

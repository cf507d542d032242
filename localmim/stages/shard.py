"""``localmim shard SRC OUT --split train|val``: an ImageFolder tree -> WebDataset tar shards.

Outputs (see :mod:`localmim.data.shards.write`): ``OUT/<split>-NNNNNN.tar``, timm's ``OUT/_info.json``, the resolved
params ``OUT/<split>.params.yaml`` and, last, the manifest ``OUT/<split>.json``. Read the shards with timm::

    timm.data.create_dataset("wds/localmim", root=OUT, split=SPLIT)

or with :class:`localmim.data.classify.ClassifyShards` (the project's one reader, :mod:`localmim.data.shards.stream`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from localmim.config.shard import ShardConfig
from localmim.pipeline.stage import StageContext, flag, stage


def _warn(msg: str) -> None:
    print(f"localmim shard: warning: {msg}", file=sys.stderr)


def source_inventory(src: str, split: str):
    """The images to shard: ``src`` itself (class folders, or ImageNet's flat val folder), or the ``<split>`` folder
    of the dataset a manifest (``localmim dataset``) names, checked against the manifest's file list: a file
    added or removed since the manifest was written is an error (the DAG would not rerun for it)."""
    from localmim.data.raw.datasets import IMAGE_SUFFIXES, is_manifest, listed_files, read_dataset_manifest, split_info
    from localmim.data.raw.imagenet_val import scan_imagenet_split

    if not is_manifest(src):
        return scan_imagenet_split(src, split)
    man = read_dataset_manifest(src)
    info = split_info(man, split, src)
    root = Path(man["root"]).expanduser()
    labels = [root / p for p in info.get("labels", [])] or None
    train_classes = sorted(split_info(man, "train", src).get("class_counts", {})) or None
    inv = scan_imagenet_split(root / info["images"], split, labels=labels, classes=train_classes)
    now = {rel for rel, _ in inv.files}
    in_class = info.get("layout", "classes") == "classes"  # class folders: files directly in the split are unread
    listed = {rel for p in listed_files(src, info["images"]) if (rel := p[len(info["images"]) + 1:])
              .lower().endswith(IMAGE_SUFFIXES) and ("/" in rel) == in_class}  # fmt: skip
    if now != listed:
        new, gone = sorted(now - listed), sorted(listed - now)
        raise ValueError(f"{root}: the dataset changed after its manifest {src} was written ({len(new)} images "
                         f"added{', e.g. ' + new[0] if new else ''}; {len(gone)} removed"
                         f"{', e.g. ' + gone[0] if gone else ''}); rerun the DAG (snakemake / dvc repro) to refresh it")
    return inv


@stage(
    "shard",
    section="shard",
    config=ShardConfig,
    help="pack an ImageFolder tree (class sub-directories) into WebDataset tar shards + manifest",
    flags=[
        flag("src", help="ImageFolder root (one sub-directory per class; for --split val also ImageNet's flat "
                         "folder of JPEGs with its ground truth), or a dataset manifest (data/raw/imagenet.json, "
                         "`localmim dataset`): its root's <split>/ folder"),
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
    from localmim.data.shards.write import ShardOptions, write_shards

    args = ctx.args
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx.dump_params(cfg, out, name=f"{args.split}.params.yaml")
    t0 = time.time()
    inv = source_inventory(args.src, args.split)
    manifest = write_shards(inv, out, args.split, ShardOptions(**cfg.to_dict()), warn=_warn)
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

"""``localmim dataset NAME OUTDIR``: the manifest of a raw dataset (the DAG's ``dataset_<name>`` nodes).

``datasets.<NAME>`` gives the folder (read where it is, never copied); empty means the embedded copy
``OUTDIR/<NAME>`` (written by ``localmim synth OUTDIR``; always fingerprinted by content, it is small). Writes
``OUTDIR/<NAME>.files.tsv.gz`` (every file the stages read: relative path, size, mtime [, sha256]) and
``OUTDIR/<NAME>.json`` (root, counts per split and class, fingerprint); see :mod:`localmim.data.raw.datasets`. Only
``stat`` is called on the files of a folder given by path, unless ``datasets.fingerprint`` is ``content`` (then
every byte is hashed once and the hashes are cached).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from localmim.config.datasets import DatasetsConfig
from localmim.pipeline.stage import StageContext, flag, stage


@stage(
    "dataset",
    section="datasets",
    config=DatasetsConfig,
    help="write the manifest of a raw dataset (datasets.<name>, or the embedded copy): file list with sizes and "
         "mtimes, counts, fingerprint; no image is read or copied",
    flags=[
        flag("name", choices=["imagenet", "ade20k", "coco"], help="which dataset"),
        flag("out", help="output directory (e.g. data/raw): writes OUT/<name>.json and OUT/<name>.files.tsv.gz; "
                         "the embedded copy is OUT/<name>"),
        flag("--fingerprint", key="fingerprint", choices=["stat", "content"],
             help="stat: path, size, mtime of every file; content: sha256 of the bytes (cached)"),
    ],
    run_name=lambda a: f"dataset_{a.name}",
    inputs=lambda cfg, a: {},  # the dataset itself is not digested again for lineage: the manifest describes it
    # A real dataset's manifest is an MLflow run (its fingerprint and counts); the embedded copy's is bookkeeping of
    # synth's output (tracked by synth's run) that DVC redoes on every `dvc repro`: no run (MLflow costs ~5 s CPU).
    # Either way the manifest is logged as the input dataset (with a digest) of the runs that read it.
    tracked=lambda cfg, a: bool(cfg.path_of(a.name)),
)
def run(cfg: DatasetsConfig, ctx: StageContext) -> dict[str, float]:
    from tqdm import tqdm

    from localmim.data.raw.datasets import write_manifest

    name, out = ctx.args.name, Path(ctx.args.out)
    given = cfg.path_of(name)
    root, source = (given, "params") if given else (str(out / name), "embedded")
    # The embedded copy is a DVC output: a checkout rewrites its files (new mtimes, same bytes), and it is small,
    # so its fingerprint is always by content.
    mode = cfg.fingerprint if given else "content"
    t0 = time.time()
    with contextlib.ExitStack() as bars:

        def progress(what: str):  # one bar per pass (stat, then sha256 in content mode), rates in files/s
            return bars.enter_context(tqdm(unit="file", desc=f"{what} {name}", file=sys.stderr, mininterval=0.5,
                                           dynamic_ncols=True)).update  # fmt: skip

        man = write_manifest(name, root, out, mode=mode, source=source, progress=progress,
                             what=f"datasets.{name}" if given else "embedded copy")
    seconds = time.time() - t0
    ctx.tracker.log_artifact(out / f"{name}.json")
    counts = ", ".join(f"{s}: {v.get('num_images', 0)} images" for s, v in man["splits"].items())
    print(f"localmim dataset: {name} at {root} ({source}): {man['num_files']} files ({counts}), "
          f"{man['total_bytes'] / 2**30:.2f} GiB, {mode} fingerprint in {seconds:.1f}s "
          f"-> {out / (name + '.json')}", file=sys.stderr)
    return {"num_files": man["num_files"], "total_bytes": man["total_bytes"], "seconds": seconds,
            "files_per_s": man["num_files"] / max(seconds, 1e-9)}

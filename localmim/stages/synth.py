"""``localmim synth OUT [--seed N]``: write the embedded mini datasets (ImageNet, ADE20K, COCO layouts)."""

from __future__ import annotations

import time
from pathlib import Path

from localmim.config.synth import SynthConfig
from localmim.pipeline.stage import StageContext, flag, stage
from localmim.utils.io import atomic_write_json


@stage(
    "synth",
    section="synth",
    config=SynthConfig,
    help="generate the embedded mini datasets: OUT/imagenet, OUT/ade20k, OUT/coco (real on-disk layouts)",
    flags=[
        flag("out", help="output directory (e.g. data/raw)"),
        flag("--seed", key="seed", type=int, metavar="N", help="random seed; same seed -> byte-identical files"),
    ],
)
def run(cfg: SynthConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.synth import generate_all

    out = Path(ctx.args.out)
    t0 = time.time()
    counts = generate_all(out, **cfg.to_dict())
    seconds = time.time() - t0
    total = sum(counts.values())
    ctx.dump_params(cfg, out, name="synth.params.yaml")
    summary = {"counts": counts, "num_images": total, "seed": cfg.seed}
    atomic_write_json(out / "synth.json", summary)
    ctx.tracker.log_artifact(out / "synth.json")
    print(f"localmim synth: wrote {total} images to {out}/{{imagenet,ade20k,coco}} in {seconds:.1f}s")
    return {**{f"num_{k}": v for k, v in counts.items()}, "num_images": total, "seconds": seconds,
            "images_per_s": total / max(seconds, 1e-9)}

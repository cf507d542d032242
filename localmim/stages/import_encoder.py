"""``localmim import SRC --from {localmim-vit,localmim-swin,mae} --out DIR``: a released pre-training checkpoint as
the encoder export of ``pretrain`` (``encoder.pt`` + ``encoder.json``), for every downstream stage's ``--encoder``.

SRC: the reference LocalMIM ViT or Swin checkpoint, MAE's, or one of this repository's pre-training checkpoints
(``data/checkpoints/pretrain/<run>/ckpt-*.pt``). The mapping is strict and its accounting is printed (see
:mod:`localmim.models.convert`). ``encoder.json`` records the source's file name and sha256 (no absolute path), the
accounting and the decisions taken; ``OUT/params.yaml`` the resolved ``imported`` section.

In the DAG the ``import_encoder`` node runs ``localmim import --placeholder-unless-source``: with ``imported.source``
null it writes a constant placeholder and ``pretrain`` trains; with a source it writes the encoder and ``pretrain``
takes it instead of training (``pretrain --imported``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from localmim.config.imported import ImportConfig
from localmim.pipeline import paths
from localmim.pipeline.stage import StageContext, StageError, flag, stage

PLACEHOLDER = {"encoder": False,
               "reason": "imported.source is null: nothing imported, the pretrain node pre-trains; set imported.source "
                         "(and imported.sha256) to start the pipeline from a released checkpoint (localmim/pipeline/"
                         "dag.py)"}


def _log(msg: str) -> None:
    print(f"localmim import: {msg}", file=sys.stderr, flush=True)


@stage(
    "import",
    section="imported",
    config=ImportConfig,
    help="turn a released LocalMIM (ViT/Swin) or MAE pre-training checkpoint, or one of ours, into the encoder "
         "export of pretrain (strict key accounting, printed)",
    flags=[
        flag("src", key="source", nargs="?", help="checkpoint file ({'model': state_dict, ...} or a state dict)"),
        flag("--from", key="format", choices=["auto", "localmim-vit", "localmim-swin", "mae"],
             help="source format, checked against the keys"),
        flag("--out", default=paths.IMPORTED, help="output directory for encoder.pt / encoder.json "
                                                    "(default: %(default)s)"),
        flag("--model", key="model", metavar="NAME", help="target architecture: a registry name, e.g. "
                                                         "localmim_vit_base_patch16 (default: read off the shapes)"),
        flag("--img-size", key="img_size", type=int, metavar="S", help="target input size (ViT pos_embed resampled)"),
        flag("--num-heads", key="num_heads", type=int, metavar="N", help="ViT attention heads when inferred"),
        flag("--final-norm", key="final_norm", choices=["fresh", "tap"], help="fresh LayerNorm after pooling "
                                                                              "(method §8.2) or the last tap's"),
        flag("--sha256", key="sha256", metavar="HEX", help="expected sha256 of SRC"),
        flag("--placeholder-unless-source", action="store_true",
             help="the DAG's node: without a source, only write a constant placeholder to OUT"),
    ],
    inputs=lambda cfg, a: {"src": cfg.source} if cfg.source else {},
)
def run(cfg: ImportConfig, ctx: StageContext) -> dict[str, float]:
    from localmim.models.convert import convert, load_checkpoint
    from localmim.models.encoder_io import write_encoder_files

    out = Path(ctx.args.out)
    if cfg.source is None:
        if ctx.args.placeholder_unless_source:
            return _placeholder(out, ctx)
        raise StageError("no source checkpoint: give SRC (or set imported.source)")
    src = Path(cfg.source)
    digest = sha256(src) if src.is_file() else None
    if cfg.sha256 and digest != cfg.sha256:
        raise StageError(f"{src}: sha256 {digest or '(no such file)'} differs from imported.sha256 "
                         f"{cfg.sha256}")
    loaded = load_checkpoint(src)  # its errors name the file
    try:
        conv = convert(loaded, cfg.format, cfg.model, cfg.img_size, cfg.num_heads, cfg.final_norm)
    except ValueError as e:  # the conversion's errors do not know the file: name it
        raise StageError(f"{src}: {e}") from None
    for line in loaded.notes + conv.arch.notes + conv.accounting.lines():
        _log(line)
    (out / "PLACEHOLDER.json").unlink(missing_ok=True)
    acc = conv.accounting
    extra = {"model": conv.arch.model, "imported": {"file": src.name, "sha256": digest, "format": cfg.format,
                                                    "layout": acc.layout, "decisions": conv.arch.notes,
                                                    "accounting": acc.to_dict()}}
    write_encoder_files(out, conv.arch.timm_name, conv.arch.timm_kwargs, conv.state_dict, extra)
    ctx.dump_params(cfg.model_copy(update={"source": src.name}), out)  # no absolute path in a DVC output
    ctx.tracker.set_tags({"imported.sha256": digest, "imported.layout": acc.layout})
    _log(f"{conv.arch.timm_name} -> {out}/encoder.pt")
    return {"source_keys": acc.source_keys, "mapped_keys": sum(acc.mapped.values()),
            "dropped_keys": sum(acc.dropped.values()), "fresh_keys": len(acc.fresh),
            "params_m": sum(v.numel() for v in conv.state_dict.values()) / 1e6}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _placeholder(out: Path, ctx: StageContext) -> dict[str, float]:
    """Replace ``out`` by a directory holding only a constant file: the same bytes whatever the other ``imported``
    params say, so DVC sees the same output hash and does not rerun ``pretrain`` (as the targets placeholder)."""
    from localmim.utils.io import atomic_write_text, replace_dir, staging_dir

    staging = staging_dir(out)
    atomic_write_text(staging / "PLACEHOLDER.json", json.dumps(PLACEHOLDER, indent=2) + "\n")
    replace_dir(staging, out)
    ctx.tracker.set_tags({"placeholder": "imported.source is null"})
    _log(f"imported.source is null: nothing imported, placeholder -> {out}")
    return {"source_keys": 0}

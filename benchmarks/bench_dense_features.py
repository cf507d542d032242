"""How spatial are an encoder's tokens? Per block, on COCO-layout val images: the mean cosine similarity of the
tokens of one image with each other, and the spatial spread (std over positions) as a fraction of the token norm,
for an exported encoder and the same architecture randomly initialised.

Dense heads (UperNet, ViTDet's simple pyramid) read positions: when the tokens of an image point the same way
(cosine near 1), what tells one position from another is a small part of each token, and the heads must first learn
to read it. A measurement, not a test; a few seconds on CPU. Not in ``make bench`` (it needs an encoder):

    python benchmarks/bench_dense_features.py --encoder data/pretrain --images data/raw/coco/val2017
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ImageNet normalisation (the encoder's)


def load_images(folder: Path, n: int, size: int) -> Tensor:
    """The first ``n`` images of ``folder`` (sorted), resized to ``size`` x ``size``, normalised. [N, 3, S, S]"""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not files:
        raise SystemExit(f"{folder}: no .jpg/.png image")
    arrs = [np.array(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@torch.no_grad()
def block_stats(vit: nn.Module, x: Tensor) -> list[dict]:
    """Per block of a timm ViT: mean pairwise token cosine within an image, spatial std / token norm, token norm."""
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    rows = []
    for i, blk in enumerate(vit.blocks):
        h = blk(h)
        t = h[:, vit.num_prefix_tokens :].double()  # [B, L, C]
        u = nn.functional.normalize(t, dim=-1)
        cos = (u @ u.transpose(1, 2)).mean()  # includes the diagonal (1/L of the mean)
        norm = t.norm(dim=-1).mean(1)  # [B]
        spread = t.std(1).norm(dim=-1) / norm  # [B]
        rows.append({"block": i + 1, "cos": float(cos), "spread": float(spread.mean()), "norm": float(norm.mean())})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="data/pretrain", help="exported encoder folder (localmim pretrain --out)")
    ap.add_argument("--images", default="data/raw/coco/val2017", help="folder of images")
    ap.add_argument("-n", type=int, default=16, help="images (the first n, sorted)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    import localmim.models  # noqa: F401  (registers the timm variants)
    from localmim.models.encoder_io import create_encoder, create_timm_model, read_encoder

    spec = read_encoder(args.encoder)
    trained = create_encoder(spec).eval()
    torch.manual_seed(args.seed)
    random = create_timm_model(spec.timm_name, **spec.timm_kwargs).eval()
    x = load_images(Path(args.images), args.n, trained.patch_embed.img_size[0])
    res = {"encoder": spec.timm_name, "images": len(x), "trained": block_stats(trained, x),
           "random_init": block_stats(random, x)}
    print(f"{spec.timm_name}, {len(x)} images of {args.images}: per block, mean token cosine within an image / "
          "spatial std as a fraction of the token norm / token norm\n")
    print("| block | trained cos | random cos | trained spread | random spread | trained norm | random norm |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(res["trained"], res["random_init"], strict=True):
        print(f"| {a['block']} | {a['cos']:.3f} | {b['cos']:.3f} | {a['spread']:.3f} | {b['spread']:.3f} "
              f"| {a['norm']:.1f} | {b['norm']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

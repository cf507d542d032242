"""Helpers for the fine-tune / linear-probe tests: tiny labelled shards and a briefly pre-trained micro encoder."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# One colour per class; a noisy, randomly placed square on a noisy background keeps the task non-trivial.
PALETTE = np.array([[200, 60, 60], [60, 180, 70], [70, 80, 210], [200, 190, 60]], dtype=np.float64)


def make_image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    img = rng.normal(120, 45, size=(size, size, 3))
    side = int(rng.integers(size // 3, size // 2))
    y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    img[y : y + side, x : x + side] = PALETTE[label] + rng.normal(0, 35, size=(side, side, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_shards(root: Path, split: str, per_class: int, *, num_classes: int = 4, per_shard: int = 30,
                seed: int = 0, size: int = 40) -> Path:
    """Write ``root/split/{split}-NNNNNN.tar`` shards (``jpg``/``cls``/``json``) and the manifest, like the
    shard stage does; returns the shard directory."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    out = root / split
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(labels), per_shard):
        name = f"{split}-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for i, lab in enumerate(labels[s : s + per_shard], start=s):
                buf = io.BytesIO()
                make_image(int(lab), rng, size).save(buf, format="JPEG", quality=95)
                w.write({"__key__": f"{split}_{i:06d}", "jpg": buf.getvalue(), "cls": str(int(lab)).encode(),
                         "json": json.dumps({"label": int(lab)}).encode()})
        shards.append({"name": name, "num_samples": len(labels[s : s + per_shard])})
    manifest = {"split": split, "classes": [f"c{k}" for k in range(num_classes)], "shards": shards,
                "num_samples": len(labels)}
    (out / f"{split}.json").write_text(json.dumps(manifest))
    return out


def pretrained_micro_encoder(train_dir: Path, out_dir: Path, steps: int = 30, mode: str = "localmim") -> Path:
    """Pre-train ``localmim_vit_micro_patch8`` (32 px) for a few steps on the shard images and export it as
    ``encoder.pt`` + ``encoder.json``; returns ``out_dir``."""
    from localmim.data.classify import decode_sample, iter_tar_samples
    from localmim.models import create
    from localmim.models.export import export_encoder

    torch.manual_seed(0)
    imgs = [decode_sample(s)[0].resize((32, 32)) for u in sorted(train_dir.glob("*.tar")) for s in iter_tar_samples(u)]
    data = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).contiguous()  # [N,3,32,32]
    model = create(f"{mode}_vit_micro_patch8")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (32,))
        loss = model(data[idx], mask_ratio=0.75)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    name, kwargs, sd = export_encoder(model.eval())
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out_dir / "encoder.pt")
    (out_dir / "encoder.json").write_text(json.dumps({"timm_name": name, "timm_kwargs": kwargs}))
    return out_dir


def plain_timm(info: dict, **overrides) -> torch.nn.Module:
    """The timm model an ``encoder.json`` / the spec of a classifier's ``model.json`` describes, built with timm
    alone (the documented rule): ``timm.create_model`` for a registered name, else the family's class from the full
    ``timm_kwargs``."""
    import timm

    name, kwargs = info["timm_name"], {**info["timm_kwargs"], **overrides}
    assert info.get("head", "timm") == "timm", "a pool_norm (Swin) classifier needs encoder_io.create_timm_model"
    if timm.is_model(name):
        return timm.create_model(name, **kwargs)
    cls = {"vit": timm.models.VisionTransformer, "swin": timm.models.SwinTransformer}[name.split("_")[0]]
    return cls(**kwargs)


MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def eval_images(val_dir: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every val image through a hand-written method §8 eval transform (shorter side -> floor(S/0.875) bicubic,
    center crop S, ImageNet normalisation in float64 NumPy): ``[N, 3, S, S]`` float32 and labels ``[N]``."""
    from localmim.data.classify import decode_sample, iter_tar_samples

    scale = math.floor(size / 0.875)
    xs, ys = [], []
    for url in sorted(val_dir.glob("*.tar")):
        for sample in iter_tar_samples(url):
            img, label = decode_sample(sample)
            w, h = img.size
            nw, nh = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
            img = img.resize((nw, nh), Image.BICUBIC)
            top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
            x = (np.asarray(img, dtype=np.float64)[top : top + size, left : left + size] / 255.0 - MEAN) / STD
            xs.append(torch.from_numpy(x).permute(2, 0, 1).float())
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)

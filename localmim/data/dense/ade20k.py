"""ADE20K (SceneParsing release layout) for semantic segmentation, method §9.1.

Layout, read directly: ``ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``.../annotations/{training,validation}/*.png`` (``ROOT`` may also be the ``ADEChallengeData2016`` folder itself).
Annotations are 8-bit label maps: 0 = other/ignore, ``k`` = class ``k - 1``. Reduce-zero-label (method §9.1):
0 -> 255 (ignored), ``k`` -> ``k - 1``, 255 stays ignored.

:func:`scan_split` validates a split before any training: every image has its annotation and the reverse, both
decode completely (:func:`localmim.data.raw.imagefile.check_image_files`: worker processes, results cached by path,
size and mtime), sizes agree, labels are in ``0..C`` or 255. With ``on_bad: skip`` a bad pair is left out with its
reason (``found = used + skipped``); with ``fail`` the first one stops the run naming the file. An empty split
always fails. A file that fails to load later (damaged after the scan) follows ``scan.pairs.skips``
(:class:`localmim.data.raw.imagefile.LoadSkips`): training substitutes the next pair (same batch size on every rank),
evaluation scores an all-ignore placeholder (index -1, nothing counted); the stage reports both.

Training reads :class:`TrainSet` through :class:`localmim.data.dense.samplers.StepBatches` with the augmentation of
:mod:`localmim.data.dense.ade20k_transforms`; every sample's randomness comes from its own seed
(``(seed, step, position in the global batch)``), so the data stream is a pure function of the step: resume is exact
whatever the number of workers, and the same on any world size. Evaluation reads :class:`ValSet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from localmim.data.dense.ade20k_transforms import IGNORE, rescale_size
from localmim.data.raw.imagefile import (
    FileCheck,
    ImageFileError,
    LoadSkips,
    check_image_files,
    first_loadable,
    read_image,
)

SPLIT_DIRS = {"train": "training", "val": "validation"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Pair:
    """One image and its annotation (``stem``: the shared file name without extension)."""

    stem: str
    image: Path
    annotation: Path


class Pairs(list):
    """The usable pairs of a split (a list of :class:`Pair`) and the rule for a file that fails to load."""

    def __init__(self, pairs=(), skips: LoadSkips | None = None):
        super().__init__(pairs)
        self.skips = skips or LoadSkips()


@dataclass
class SplitScan:
    """The result of validating one split: usable pairs, every skipped file with its reason, and notes on usable
    files worth naming (e.g. PNG content under a ``.jpg`` name)."""

    split: str
    pairs: Pairs
    skipped: list[dict[str, str]]
    found: int
    notes: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict:
        return {"found": self.found, "used": len(self.pairs), "skipped": len(self.skipped),
                "skipped_items": self.skipped, "notes": self.notes}


def ade20k_root(path: str | Path) -> Path:
    """The ``ADEChallengeData2016`` folder under (or at) ``path``."""
    path = Path(path)
    for cand in (path / "ADEChallengeData2016", path):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise ValueError(f"{path}: not an ADE20K release (expected ADEChallengeData2016/images and /annotations)")


def _check_pair(pair: Pair, num_classes: int, checks: dict[str, FileCheck]) -> str | None:
    """The reason ``pair`` is unusable, or None (``checks``: the full-decode results of both files)."""
    img, ann = checks[str(pair.image)], checks[str(pair.annotation)]
    if img.reason:
        return f"unreadable image: {img.reason}"
    if ann.reason:
        return f"unreadable annotation {pair.annotation.name}: {ann.reason}"
    if ann.ndim != 2:
        return f"annotation is not a single-channel label map ({ann.ndim} dimensions)"
    if (ann.width, ann.height) != (img.width, img.height):
        return f"image {img.width}x{img.height} vs annotation {ann.width}x{ann.height}"
    bad = [v for v in ann.values if v > num_classes and v != IGNORE]
    if bad:
        return f"label values {bad[:5]} above num_classes={num_classes} (only 0..{num_classes} and 255)"
    return None


def scan_split(root: str | Path, split: str, num_classes: int, on_bad: str = "skip", workers: int = 0,
               cache: str | Path | None = None, progress: bool = False) -> SplitScan:
    """Validate ``split`` (``train``/``val``) of the ADE20K release at ``root`` (see the module docstring).

    ``workers``: decode processes (0 = every CPU); ``cache``: the check cache file (None = no cache).

    Raises:
        ValueError: missing folders, an empty split, or (``on_bad='fail'``) the first bad file, named.
    """
    base = ade20k_root(root)
    img_dir, ann_dir = base / "images" / SPLIT_DIRS[split], base / "annotations" / SPLIT_DIRS[split]
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise ValueError(f"{d}: missing ADE20K {split} folder")
    images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    anns = {p.stem: p for p in sorted(ann_dir.iterdir()) if p.suffix.lower() == ".png"}
    others = [p for p in sorted(img_dir.iterdir()) if p.is_file() and p.suffix.lower() not in IMAGE_EXTS]
    skipped = [{"file": str(p), "reason": "not an image file (extension)"} for p in others]
    skipped += [{"file": str(p), "reason": "image without annotation"} for s, p in images.items() if s not in anns]
    skipped += [{"file": str(p), "reason": "annotation without image"} for s, p in anns.items() if s not in images]
    candidates = [Pair(s, images[s], anns[s]) for s in sorted(images.keys() & anns.keys())]
    checks = check_image_files([t for p in candidates for t in ((p.image, "image"), (p.annotation, "label"))],
                               cache=cache, workers=workers, progress=progress, desc=f"check ADE20K {split}")
    reasons = [_check_pair(p, num_classes, checks) for p in candidates]
    pairs = Pairs(p for p, r in zip(candidates, reasons, strict=True) if r is None)
    skipped += [{"file": str(p.image), "reason": r} for p, r in zip(candidates, reasons, strict=True) if r]
    notes = [{"file": f, "note": checks[f].note} for p in pairs for f in (str(p.image), str(p.annotation))
             if checks[f].note]
    found = len(others) + len(images.keys() | anns.keys())
    if skipped and on_bad == "fail":
        first = skipped[0]
        raise ValueError(f"{first['file']}: {first['reason']} (ADE20K {split}; on_bad=fail, {len(skipped)} bad)")
    if not pairs:
        raise ValueError(f"{img_dir}: empty ADE20K {split} split ({found} files found, {len(skipped)} skipped)")
    return SplitScan(split, pairs, skipped, found, notes)


def reduce_zero_label(ann: np.ndarray) -> np.ndarray:
    """ADE20K label map -> training labels: 0 -> 255, k -> k - 1 (1..254), 255 -> 255. uint8 in, uint8 out."""
    lut = np.arange(256, dtype=np.int16) - 1
    lut[0] = IGNORE
    lut[IGNORE] = IGNORE
    return lut.astype(np.uint8)[ann]


def load_pair(pair: Pair) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """uint8 image ``[3, H, W]`` and reduced label map ``[H, W]`` (uint8, 255 = ignore); ImageFileError naming
    the file that does not decode."""
    img = np.asarray(read_image(pair.image))
    ann = reduce_zero_label(np.asarray(read_image(pair.annotation, mode=None)))
    return tv_tensors.Image(torch.from_numpy(img.copy()).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(ann))


class TrainSet(torch.utils.data.Dataset):
    """Training pairs; ``ds[(index, seed)]`` -> augmented ``(uint8 [3, S, S], uint8 [S, S])`` drawn from ``seed``."""

    def __init__(self, pairs: list[Pair], transform: v2.Compose):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        skips = getattr(self.pairs, "skips", None) or LoadSkips()
        # a pair that no longer decodes: the next one takes its place (same seed), so the batch keeps its size
        (img, mask), _ = first_loadable(lambda i: load_pair(self.pairs[i]), index, len(self.pairs), skips)
        with torch.random.fork_rng(devices=[]):  # never disturbs the caller's RNG (num_workers=0)
            torch.manual_seed(seed)
            img, mask = self.transform(img, mask)
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class ValSet(torch.utils.data.Dataset):
    """Validation pairs for this rank (``rank::world``): the image at the test scale (keep ratio) and the
    reduced label map at its original size, plus the index into ``pairs``. A pair that no longer decodes gives
    a placeholder: index -1 and an all-ignore label map, so it adds nothing to the confusion matrix."""

    def __init__(self, pairs: list[Pair], test_scale: tuple[int, int], rank: int = 0, world: int = 1):
        self.pairs, self.test_scale = pairs, test_scale
        self.indices = list(range(rank, len(pairs), world))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        idx = self.indices[i]
        try:
            img, mask = load_pair(self.pairs[idx])
        except ImageFileError as e:  # recorded (or raised under on_bad=fail); scored as if absent
            (getattr(self.pairs, "skips", None) or LoadSkips()).handle(e)
            s = min(self.test_scale)
            return torch.zeros(3, s, s, dtype=torch.uint8), torch.full((s, s), IGNORE, dtype=torch.uint8), -1
        img = F.resize(img, list(rescale_size(*img.shape[-2:], self.test_scale)), antialias=True)
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), idx


__all__ = ["IGNORE", "Pair", "Pairs", "SplitScan", "TrainSet", "ValSet", "ade20k_root", "load_pair",
           "reduce_zero_label", "scan_split"]

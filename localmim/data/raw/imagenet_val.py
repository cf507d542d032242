"""ImageNet splits in the layouts users have: class folders (ImageFolder), and for validation also the official flat
folder of JPEGs (``ILSVRC2012_val_00000001.JPEG`` ...) with its ground truth.

Ground truth of the flat folder, found by :func:`localmim.data.raw.datasets.find_val_labels`:

* Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of every box is the synset id);
* the devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` (line i: the ILSVRC2012_ID of
  ``ILSVRC2012_val_<i>``) with ``data/meta.mat`` (ILSVRC2012_ID -> WNID of the 1000 leaf synsets, read with
  ``scipy.io.loadmat`` as torchvision's ``parse_devkit_archive`` does), as a folder or as the devkit's ``.tar.gz``.

Class order is the sorted synset ids (WNIDs), as timm and torchvision use; for a flat val folder the classes are
those of the ``train`` class folders next to it when there are any (so that indices agree), else those named by
the ground truth. The samples of a flat folder are ordered as their class-folder paths (``<wnid>/<file>``) would
be, so both layouts of the same images give the same shards (only the recorded source path differs).
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from pathlib import Path

from localmim.data.raw.datasets import DEVKIT, DEVKIT_FILES, IMAGE_SUFFIXES, LOC_CSV, find_val_labels, layout_of
from localmim.data.raw.imagefolder import Inventory, scan_image_folder


class LabelsError(ValueError):
    """Ground truth missing, unreadable or inconsistent; the message names the file (and image) concerned."""


def read_loc_csv(path: Path) -> dict[str, str]:
    """``LOC_val_solution.csv`` -> {image id: wnid}; every box of an image must name the same synset."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
            raise LabelsError(f"{path}: expected the columns ImageId,PredictionString (got {reader.fieldnames})")
        for row in reader:
            tokens = row["PredictionString"].split()
            wnids = set(tokens[0::5])  # boxes are "wnid x0 y0 x1 y1"
            if len(wnids) != 1:
                raise LabelsError(f"{path}: image {row['ImageId']}: boxes name {sorted(wnids) or 'no'} synsets, "
                                  f"expected exactly one")
            out[row["ImageId"]] = wnids.pop()
    return out


def _leaf_wnids(meta_mat: bytes | Path, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the leaf synsets (``num_children == 0``) of the devkit's ``meta.mat``."""
    try:
        import scipy.io as sio
    except ImportError:
        raise LabelsError(f"{where}: reading meta.mat needs scipy, which is not installed; install scipy or give "
                          f"the ground truth as {LOC_CSV}") from None
    src = io.BytesIO(meta_mat) if isinstance(meta_mat, bytes) else str(meta_mat)
    try:
        synsets = sio.loadmat(src, squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise LabelsError(f"{where}: not a devkit meta.mat with a 'synsets' table ({type(e).__name__}: {e})") from None


def read_devkit(files: list[Path]) -> dict[str, str]:
    """The devkit's ground truth (its folder's two files, or the ``.tar.gz``) -> {image id: wnid}."""
    if len(files) == 1:  # ILSVRC2012_devkit_t12.tar.gz
        where = str(files[0])
        try:
            with tarfile.open(files[0]) as tar:
                gt_text, meta = (tar.extractfile(f"{DEVKIT}/{name}").read() for name in DEVKIT_FILES)
        except (tarfile.TarError, KeyError, AttributeError, OSError) as e:
            raise LabelsError(f"{where}: cannot read {DEVKIT}/{DEVKIT_FILES[0]} and {DEVKIT_FILES[1]} from it "
                              f"({e})") from None
        gt_lines = gt_text.decode().split()
    else:
        gt_path, meta = files
        where = str(gt_path.parent.parent)
        gt_lines = gt_path.read_text().split()
    wnid_of = _leaf_wnids(meta, where)
    out = {}
    for i, line in enumerate(gt_lines, start=1):
        if int(line) not in wnid_of:
            raise LabelsError(f"{where}: ground truth line {i}: ILSVRC2012_ID {line} is not a leaf synset of meta.mat")
        out[f"ILSVRC2012_val_{i:08d}"] = wnid_of[int(line)]
    return out


def read_val_labels(files: list[Path]) -> dict[str, str]:
    """{image id (file name without extension): wnid} from the ground-truth files of :func:`find_val_labels`."""
    return read_loc_csv(files[0]) if files[0].name == LOC_CSV else read_devkit(files)


def _train_classes(val_dir: Path) -> list[str] | None:
    train = val_dir.parent / "train"
    if not train.is_dir():
        return None
    return sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")) or None


def scan_flat_val(val_dir: str | Path, labels: list[Path] | None = None,
                  classes: list[str] | None = None) -> Inventory:  # fmt: skip
    """The flat val folder as an :class:`Inventory` (class index = position in the sorted synset ids).

    Args:
        val_dir: the folder of JPEGs.
        labels: ground-truth files (default: found next to ``val_dir``, see :func:`find_val_labels`).
        classes: sorted class names (default: the ``train`` class folders beside ``val_dir``, else the ground
            truth's synsets).

    Raises:
        LabelsError: an image without a label, or a label outside ``classes``; the message names the image.
    """
    root = Path(val_dir)
    files_ = labels or find_val_labels(root)
    wnid_of = read_val_labels(files_)
    classes = sorted(classes or _train_classes(root) or set(wnid_of.values()))
    index = {c: i for i, c in enumerate(classes)}
    names = sorted(e.name for e in os.scandir(root) if e.is_file() and not e.name.startswith("."))
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    files = []
    for n in images:
        wnid = wnid_of.get(Path(n).stem)
        if wnid is None:
            raise LabelsError(f"{root / n}: no ground-truth label for it in {', '.join(map(str, files_))}")
        if wnid not in index:
            raise LabelsError(f"{root / n}: labelled {wnid} in {files_[0]}, which is not one of the {len(classes)} "
                              f"classes ({classes[0]} .. {classes[-1]})")
        files.append((n, index[wnid]))
    files.sort(key=lambda f: f"{classes[f[1]]}/{f[0]}")  # the class-folder layout's order
    ignored = sorted(set(names) - set(images))
    return Inventory(root, classes, files, ignored)


def scan_imagenet_split(src: str | Path, split: str, *, labels: list[Path] | None = None,
                        classes: list[str] | None = None) -> Inventory:  # fmt: skip
    """An ImageNet split in either layout: class folders (:func:`scan_image_folder`) or, for ``val``, the flat
    folder with its ground truth (:func:`scan_flat_val`)."""
    root = Path(src)
    if not root.is_dir() or layout_of(root) == "classes":
        return scan_image_folder(root)
    if split != "val":
        raise FileNotFoundError(f"{root}: no class sub-directories found (a flat folder of images is read only as "
                                f"ImageNet's val split, with its ground truth)")
    return scan_flat_val(root, labels, classes)


__all__ = ["LabelsError", "read_val_labels", "scan_flat_val", "scan_imagenet_split"]

"""Manifests of the raw datasets (ImageNet, ADE20K, COCO): what the DAG tracks instead of the images themselves.

``localmim dataset NAME OUTDIR`` (the ``dataset_<name>`` nodes of the DAG) describes the folder given by the param
``datasets.<name>`` (or, when that is empty, the embedded copy ``OUTDIR/<name>`` written by ``localmim synth``):

* ``OUTDIR/<name>.files.tsv.gz``: every file the stages read, one line each (path relative to the root, size,
  mtime in ns, and the sha256 of the bytes with ``datasets.fingerprint: content``), sorted by path;
* ``OUTDIR/<name>.json``: the root, counts per split (and per class for ImageNet), total bytes, and a fingerprint
  (sha256 of the file list: path, size and mtime; or path, size and sha256 of the bytes in content mode).

Only ``stat`` is called on the files: no image byte is read or copied (content mode reads the bytes once and
caches the hashes by path, size and mtime in ``OUTDIR/.cache/``). Later stages take the dataset root from the
manifest (:func:`dataset_root`, :func:`split_dir`). Both outputs are a function of the listed files (and of the
root as written in params), so an unchanged dataset gives byte-identical manifests and DVC reruns nothing after it;
a changed, added or removed file changes the fingerprint and reruns what reads the manifest.

Standard library only: the Snakefile imports it to compute its rerun trigger (workflow/rules/common.smk).
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "localmim-dataset/1"
NAMES = ("imagenet", "ade20k", "coco")
MODES = ("stat", "content")
EXPECTED = {
    "imagenet": "the folder holding the train/ and val/ ImageFolder trees (val may also be the official flat folder "
                "of JPEGs with its ground truth)",
    "ade20k": "the folder holding ADEChallengeData2016/",
    "coco": "the folder holding train2017/, val2017/ and annotations/",
}  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # = ImageFolder's
SCAN_THREADS = 16  # stat calls in flight (a network file system answers them in parallel)
Progress = Callable[[int], None] | None  # called with the number of files just done

# ImageNet validation ground truth (flat layout): Kaggle's CSV, or the devkit's text file + meta.mat (as a folder or
# as torchvision's ILSVRC2012_devkit_t12.tar.gz).
LOC_CSV = "LOC_val_solution.csv"
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_FILES = ("data/ILSVRC2012_validation_ground_truth.txt", "data/meta.mat")


class DatasetError(ValueError):
    """A dataset folder or manifest is not what a stage needs; the message names the path and what is missing."""


@dataclass(frozen=True)
class Part:
    """A piece of a dataset read by the stages: a folder (listed recursively) or one file, relative to the root."""

    path: str
    split: str
    kind: str  # images | annotations | labels
    is_dir: bool = True


def parts(name: str, root: Path) -> list[Part]:
    """What the stages read of dataset ``name`` at ``root`` (required parts; ImageNet val labels when flat)."""
    if name == "imagenet":
        found = [Part("train", "train", "images"), Part("val", "val", "images")]
        if (root / "val").is_dir() and layout_of(root / "val") == "flat":
            found += [Part(os.path.relpath(p, root), "val", "labels", False) for p in find_val_labels(root / "val")]
        return found
    if name == "ade20k":  # ade20k.ade20k_root also accepts the ADEChallengeData2016 folder itself
        base = "ADEChallengeData2016/" if (root / "ADEChallengeData2016").is_dir() else ""
        splits = (("train", "training"), ("val", "validation"))
        return [Part(f"{base}{kind}/{ade}", split, kind) for split, ade in splits for kind in ("images", "annotations")]
    if name == "coco":
        return [p for split in ("train", "val") for p in (
            Part(f"{split}2017", split, "images"),
            Part(f"annotations/instances_{split}2017.json", split, "annotations", False))]  # fmt: skip
    raise DatasetError(f"unknown dataset {name!r} (known: {', '.join(NAMES)})")


def layout_of(split_dir: Path) -> str:
    """``classes`` (sub-directories, ImageFolder) or ``flat`` (image files directly in the folder, no sub-folder)."""
    with os.scandir(split_dir) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    if any(e.is_dir() for e in entries):
        return "classes"
    return "flat" if any(e.name.lower().endswith(IMAGE_SUFFIXES) for e in entries) else "classes"


def find_val_labels(val_dir: Path) -> list[Path]:
    """The ground truth of a flat ImageNet val folder: ``LOC_val_solution.csv`` in the folder or up to four folders
    above (Kaggle keeps it next to ``ILSVRC/``), else the devkit (``ILSVRC2012_devkit_t12/`` with its ground-truth
    text file and ``meta.mat``, or ``ILSVRC2012_devkit_t12.tar.gz``) in the folder or the one above.

    Raises:
        DatasetError: none found; the message lists every place looked at.
    """
    val_dir = Path(val_dir)
    above = [val_dir, *list(val_dir.resolve().parents)[:4]]
    for d in above:
        if (d / LOC_CSV).is_file():
            return [d / LOC_CSV]
    for d in above[:2]:
        files = [d / DEVKIT / f for f in DEVKIT_FILES]
        if all(f.is_file() for f in files):
            return files
        if (d / f"{DEVKIT}.tar.gz").is_file():
            return [d / f"{DEVKIT}.tar.gz"]
    raise DatasetError(
        f"{val_dir}: a flat ImageNet val folder needs its ground truth, and none was found: looked for {LOC_CSV} in it "
        f"and up to 4 folders above, and for {DEVKIT}/{DEVKIT_FILES[0]} + {DEVKIT}/{DEVKIT_FILES[1]} or "
        f"{DEVKIT}.tar.gz in it and the folder above (or put the images in one folder per class)")


# ------------------------------------------------------------------------------------------------------- scanning


def _scan_dir(root: Path, rel: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Files (path, size, mtime_ns) and sub-directories of one folder; hidden entries are left out."""
    files, dirs = [], []
    with os.scandir(root / rel) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            path = f"{rel}/{e.name}"
            if "\t" in e.name or "\n" in e.name:  # the file list is tab- and line-separated
                raise DatasetError(f"{str(root / path)!r}: a tab or newline in a file name is not supported")
            if e.is_dir():  # follows symlinks, like ImageFolder's walk
                dirs.append(path)
            elif e.is_file():
                st = e.stat()
                files.append((path, st.st_size, st.st_mtime_ns))
    return files, dirs


def list_tree(root: Path, rel: str, threads: int = SCAN_THREADS,
              progress: Progress = None) -> list[tuple[str, int, int]]:  # fmt: skip
    """Every file below ``root/rel`` as (path relative to ``root``, size, mtime_ns), folders scanned in parallel;
    ``progress(n)`` is called with the number of files of every folder done."""
    out: list[tuple[str, int, int]] = []
    with ThreadPoolExecutor(threads) as pool:
        pending = {pool.submit(_scan_dir, root, rel)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                files, dirs = fut.result()
                out += files
                if progress is not None:
                    progress(len(files))
                pending |= {pool.submit(_scan_dir, root, d) for d in dirs}
    return out


def _stat_file(root: Path, rel: str) -> tuple[str, int, int]:
    st = (root / rel).stat()
    return rel, st.st_size, st.st_mtime_ns


def scan(name: str, root: str | Path, what: str | None = None,
         progress: Progress = None) -> tuple[list[tuple[str, int, int]], list[Part]]:  # fmt: skip
    """All files the stages read of dataset ``name`` at ``root``, sorted by path, with the parts they belong to.

    ``what`` names the root in errors (e.g. ``datasets.imagenet``).

    Raises:
        DatasetError: the root or a required part is missing.
    """
    root_p = Path(root).expanduser()
    what = f"{what}: {root}" if what else str(root)
    if not root_p.is_dir():
        raise DatasetError(f"{what}: not a directory (expected {EXPECTED[name]})")
    found = parts(name, root_p)
    missing = [p.path + ("/" if p.is_dir else "") for p in found
               if not ((root_p / p.path).is_dir() if p.is_dir else (root_p / p.path).is_file())]  # fmt: skip
    if missing:
        raise DatasetError(f"{what}: missing {', '.join(missing)} (expected {EXPECTED[name]})")
    entries: list[tuple[str, int, int]] = []
    for p in found:
        entries += list_tree(root_p, p.path, progress=progress) if p.is_dir else [_stat_file(root_p, p.path)]
    entries = sorted(set(entries))
    return entries, found


# ------------------------------------------------------------------------------------------------------- hashing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_hash_cache(path: Path, root: Path) -> dict[str, tuple[int, int, str]]:
    """The cache of :func:`content_hashes` if it was written for ``root`` (its first line names it), else empty."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            if f.readline().rstrip("\n") != f"# root\t{root.resolve()}":
                return {}
            rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
        return {r[0]: (int(r[1]), int(r[2]), r[3]) for r in rows if len(r) == 4}
    except (OSError, ValueError, EOFError):
        return {}


def content_hashes(root: Path, entries: list[tuple[str, int, int]], cache: Path | None,
                   progress: Progress = None) -> list[str]:  # fmt: skip
    """sha256 of every entry's bytes; a file whose path, size and mtime are in ``cache`` (written for this root) is
    not read again. The cache is rewritten with the current entries."""
    old = _read_hash_cache(cache, root) if cache else {}

    def one(e: tuple[str, int, int]) -> str:
        hit = old.get(e[0])
        sha = hit[2] if hit and hit[:2] == e[1:] else _sha256_file(root / e[0])
        if progress is not None:
            progress(1)
        return sha

    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        shas = list(pool.map(one, entries, chunksize=64))
    if cache is not None:
        rows = [f"{p}\t{s}\t{m}\t{h}" for (p, s, m), h in zip(entries, shas, strict=True)]
        _write_gz_lines(cache, [f"# root\t{root.resolve()}", "# path\tsize\tmtime_ns\tsha256", *rows])
    return shas


def _write_gz_lines(path: Path, lines: list[str]) -> None:
    """Deterministic gzip (no name, mtime 0) written under a temp name and renamed."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(("\n".join(lines) + "\n").encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def fingerprint(entries: list[tuple[str, int, int]], shas: list[str] | None = None) -> str:
    """sha256 over the sorted file list: path, size, and mtime (stat mode) or the bytes' sha256 (content mode)."""
    h = hashlib.sha256()
    for i, (path, size, mtime) in enumerate(entries):
        h.update(f"{path}\t{size}\t{shas[i] if shas is not None else mtime}\n".encode())
    return f"sha256:{h.hexdigest()}"


def state(name: str, root: str, mode: str = "stat", outdir: str | Path | None = None) -> str:
    """The fingerprint of dataset ``name`` at ``root`` as :func:`write_manifest` into ``outdir`` computes it
    (Snakemake's rerun trigger of the ``dataset_<name>`` rule; content mode shares the manifest's hash cache)."""
    entries, _ = scan(name, root, f"datasets.{name}")
    return fingerprint(entries, _shas(name, root, entries, mode, outdir))


def _shas(name: str, root: str | Path, entries: list, mode: str, outdir: str | Path | None,
          progress: Progress = None) -> list[str] | None:  # fmt: skip
    if mode not in MODES:
        raise DatasetError(f"datasets.fingerprint={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "stat":
        return None
    cache = Path(outdir) / ".cache" / f"{name}.sha256.tsv.gz" if outdir is not None else None
    return content_hashes(Path(root).expanduser(), entries, cache, progress)


# ------------------------------------------------------------------------------------------------------- manifest


def _range(paths: list[str], folder: str) -> tuple[int, int]:
    """Index range of the sorted ``paths`` below ``folder`` (``"0"`` is the character after ``"/"``)."""
    return bisect.bisect_left(paths, folder + "/"), bisect.bisect_left(paths, folder + "0")


def _part_info(part: Part, paths: list[str], sizes: dict[str, int], root: Path) -> dict[str, Any]:
    """What the manifest says about one part: its path and file counts (per class for ImageNet class folders)."""
    if part.kind == "labels":
        return {"labels": [part.path]}
    if not part.is_dir:
        return {part.kind: part.path, f"{part.kind}_bytes": sizes[part.path]}
    lo, hi = _range(paths, part.path)
    sel = paths[lo:hi]
    images = [p for p in sel if p.lower().endswith(IMAGE_SUFFIXES)]
    info: dict[str, Any] = {part.kind: part.path,
                            f"num_{part.kind}": len(images) if part.kind == "images" else len(sel)}  # fmt: skip
    if part.path in ("train", "val"):  # ImageNet: the layout, and the class counts of class folders
        info["layout"] = layout_of(root / part.path)
        info["num_other_files"] = len(sel) - len(images)
        if info["layout"] == "classes":
            counts: dict[str, int] = {}
            for p in images:
                rel = p[len(part.path) + 1:]
                if "/" in rel:
                    cls = rel.split("/", 1)[0]
                    counts[cls] = counts.get(cls, 0) + 1
            info["class_counts"] = dict(sorted(counts.items()))
    return info


def build_manifest(name: str, root: str, entries: list[tuple[str, int, int]], found: list[Part],
                   shas: list[str] | None, source: str) -> dict[str, Any]:  # fmt: skip
    paths = [e[0] for e in entries]
    sizes = {p.path: entries[bisect.bisect_left(paths, p.path)][1] for p in found if not p.is_dir}
    splits: dict[str, dict[str, Any]] = {}
    for part in found:
        info = _part_info(part, paths, sizes, Path(root).expanduser())
        split = splits.setdefault(part.split, {})
        for k, v in info.items():
            split[k] = split.get(k, []) + v if isinstance(v, list) else v
    return {
        "format": FORMAT,
        "dataset": name,
        "source": source,
        "root": str(root),
        "fingerprint_mode": "stat" if shas is None else "content",
        "fingerprint": fingerprint(entries, shas),
        "num_files": len(entries),
        "total_bytes": sum(e[1] for e in entries),
        "splits": splits,
        "files": f"{name}.files.tsv.gz",
    }


def write_manifest(name: str, root: str, outdir: str | Path, *, mode: str = "stat", source: str = "params",
                   what: str | None = None, progress: Callable[[str], Progress] | None = None) -> dict[str, Any]:
    """Scan dataset ``name`` at ``root`` and write ``outdir/<name>.files.tsv.gz`` and, last, ``outdir/<name>.json``
    (see the module docstring). Returns the manifest. ``progress(pass_name)`` gives the counter of a pass."""
    outdir = Path(outdir)
    entries, found = scan(name, root, what, progress("stat") if progress else None)
    shas = _shas(name, root, entries, mode, outdir, progress("sha256") if progress else None)
    head = "# path\tsize\tmtime_ns" + ("\tsha256" if shas is not None else "")
    rows = [f"{p}\t{s}\t{m}" + (f"\t{shas[i]}" if shas is not None else "") for i, (p, s, m) in enumerate(entries)]
    _write_gz_lines(outdir / f"{name}.files.tsv.gz", [head, *rows])
    man = build_manifest(name, root, entries, found, shas, source)
    path = outdir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(man, indent=2) + "\n")
    os.replace(tmp, path)
    return man


def is_manifest(path: str | Path) -> bool:
    """Whether ``path`` is a dataset manifest written by :func:`write_manifest` (a ``.json`` file of this format)."""
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_dataset_manifest(path: str | Path) -> dict[str, Any]:
    """The dataset manifest at ``path``; DatasetError naming the file when it is missing or not one."""
    p = Path(path)
    try:
        man = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{p}: not a readable dataset manifest ({e}); run `localmim dataset` (the DAG's "
                           f"dataset_* nodes) first") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise DatasetError(f"{p}: not a dataset manifest (format {FORMAT!r} expected)")
    return man


def dataset_root(path: str | Path) -> Path:
    """The dataset folder named by ``path``: the ``root`` of a dataset manifest, else ``path`` itself."""
    return Path(read_dataset_manifest(path)["root"]).expanduser() if is_manifest(path) else Path(path)


def split_info(man: dict[str, Any], split: str, source: str | Path = "manifest") -> dict[str, Any]:
    try:
        return man["splits"][split]
    except KeyError:
        raise DatasetError(f"{source}: no {split!r} split in the {man.get('dataset')} manifest") from None


def listed_files(manifest_path: str | Path, prefix: str) -> list[str]:
    """Paths (relative to the root) of the manifest's file list below folder ``prefix``, sorted."""
    man_path = Path(manifest_path)
    files = man_path.parent / read_dataset_manifest(man_path)["files"]
    try:
        with gzip.open(files, "rt", encoding="utf-8") as f:
            paths = [line.split("\t", 1)[0] for line in f if not line.startswith("#")]
    except (OSError, EOFError) as e:
        raise DatasetError(f"{files}: file list of {man_path} unreadable ({e})") from None
    lo, hi = _range(paths, prefix)
    return paths[lo:hi]

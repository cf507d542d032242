"""ImageFolder trees (good, and every kind of bad input) and shard readers for the shard and tar tests."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(rng: np.random.Generator, w: int, h: int, mode: str = "RGB", quality: int = 90) -> bytes:
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(rng: np.random.Generator) -> bytes:
    """A valid small JPEG whose SOF header claims 60000 x 50000 pixels."""
    data = bytearray(_jpeg(rng, 16, 16))
    i = data.index(b"\xff\xc0")  # baseline SOF0: marker, length(2), precision(1), height(2), width(2)
    data[i + 5 : i + 9] = (50000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    return bytes(data)


def make_good_folder(root: Path, classes: int = 3, per_class: int = 5, seed: int = 0) -> dict[str, int]:
    """RGB JPEGs of varying size; returns {relative path: class index}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for c in range(classes):
        d = root / f"n{c:08d}_cls{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"img_{i:03d}.JPEG").write_bytes(_jpeg(rng, int(rng.integers(20, 64)), int(rng.integers(20, 64))))
            truth[f"{d.name}/img_{i:03d}.JPEG"] = c
    return truth


# relative path -> expected skip reason prefix (None = written); the empty class "n9_empty" sorts last
BAD = {
    "n00000000_cls0/truncated.JPEG": "truncated JPEG: image file is truncated",
    "n00000000_cls0/zero.JPEG": "zero-byte file",
    "n00000000_cls0/header_cut.JPEG": "truncated JPEG: ",
    "n00000001_cls1/text.JPEG": "not an image: cannot identify image file",
    "n00000001_cls1/bomb.JPEG": "decompression bomb: 60000x50000 px > limit",
    "n00000002_cls2/locked.JPEG": "unreadable file: Permission denied",
    "n00000001_cls1/png_named.JPEG": None,
    "n00000002_cls2/cmyk.JPEG": None,
    "n00000002_cls2/gray.JPEG": None,
    "n00000002_cls2/ünïcödé_名前.JPEG": None,
}
REENCODED = {"n00000001_cls1/png_named.JPEG": "PNG file", "n00000002_cls2/cmyk.JPEG": "CMYK JPEG",
             "n00000002_cls2/gray.JPEG": "L JPEG"}  # fmt: skip


def make_bad_folder(root: Path) -> dict[str, int]:
    truth = make_good_folder(root)
    rng = np.random.default_rng(1)
    good = _jpeg(rng, 200, 160)  # cut in the middle of the entropy-coded data
    files = {
        "n00000000_cls0/truncated.JPEG": good[: len(good) // 2],
        "n00000000_cls0/zero.JPEG": b"",
        "n00000000_cls0/header_cut.JPEG": good[:300],  # cut inside the header tables
        "n00000001_cls1/text.JPEG": b"this is not an image\n",
        "n00000001_cls1/bomb.JPEG": _bomb(rng),
        "n00000002_cls2/locked.JPEG": _jpeg(rng, 30, 30),
        "n00000001_cls1/png_named.JPEG": _png(rng, 33, 21),
        "n00000002_cls2/cmyk.JPEG": _jpeg(rng, 40, 24, "CMYK"),
        "n00000002_cls2/gray.JPEG": _jpeg(rng, 24, 40, "L"),
        "n00000002_cls2/ünïcödé_名前.JPEG": _jpeg(rng, 26, 26),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
        truth[rel] = int(rel.split("/")[0][-1])
    (root / "n9_empty").mkdir()
    (root / "n00000000_cls0" / "README.txt").write_text("not an image extension: ignored, not found\n")
    return truth


def _lock(monkeypatch, name: str = "locked.JPEG") -> None:
    """Tests run as root (chmod 000 would not stop reading): simulate the OS error of an unreadable file."""
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def read_tars(out: Path, split: str = "train") -> list[dict]:
    """All samples of a split, read with the standard library (independent of webdataset), in shard order."""
    samples = []
    for tar in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
            for m in members:
                assert (m.mtime, m.uid, m.gid, m.mode, m.uname) == (0, 0, 0, 0o444, "localmim")
            by_key: dict[str, dict] = {}
            for m in members:
                key, ext = m.name.split(".", 1)
                by_key.setdefault(key, {"__key__": key, "__shard__": tar.name})[ext] = tf.extractfile(m).read()
        samples.extend(by_key.values())
    return samples


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tar_digests(out: Path, split: str = "train") -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(out.glob(f"{split}-*.tar"))}

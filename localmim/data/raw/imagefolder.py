"""ImageFolder input of the shard writer: listing a class-directory tree and verifying / converting one image.

Every problem with one file is a property of that file and comes back as a skip reason (``Prepared.skip``), so
the packer can either list it in the manifest or fail naming the file (``on_bad``).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from localmim.data.shards.manifest import IMAGE_FILE_SUFFIXES


class BadImageError(ValueError):
    """An input image cannot be used (raised with ``on_bad="fail"``); the message names file and problem."""


# ---------------------------------------------------------------------------------------------------- scanning


@dataclass
class Inventory:
    """An ImageFolder tree: sorted class directory names and the image files under them (sorted paths)."""

    root: Path
    classes: list[str]
    files: list[tuple[str, int]]  # (posix path relative to root, class index)
    ignored: list[str] = field(default_factory=list)  # files without an image extension


def scan_image_folder(src: str | Path) -> Inventory:
    """List an ImageFolder tree: every sub-directory of ``src`` is a class (index = sorted position), every file
    below it with an image extension (case-insensitive) is a sample. Hidden entries (``.*``) are not listed."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (expected an ImageFolder tree of class sub-directories)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root}: no class sub-directories found")
    files: list[tuple[str, int]] = []
    ignored: list[str] = []
    for idx, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                rel = (Path(dirpath) / fn).relative_to(root).as_posix()
                (files.append((rel, idx)) if fn.lower().endswith(IMAGE_FILE_SUFFIXES) else ignored.append(rel))
    files.sort()
    return Inventory(root, classes, files, sorted(ignored))


# ---------------------------------------------------------------------------------------------------- one image


@dataclass
class Prepared:
    """Result of :func:`prepare_image`: either JPEG bytes to store or the reason the file is skipped."""

    jpg: bytes | None = None
    size: tuple[int, int] = (0, 0)  # stored width, height
    reencoded: str | None = None  # why the bytes are not the original ones
    skip: str | None = None
    members: bytes = b""  # the sample serialized as tar members (see tar_members)


@contextlib.contextmanager
def _own_bomb_check() -> Iterator[None]:
    # PIL raises DecompressionBombError inside Image.open above 2x its limit; we check the header size against
    # our own limit instead, to report "decompression bomb: WxH px" uniformly. Not thread-safe (process workers).
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def sniff_format(data: bytes) -> str:
    """Format from the magic bytes (for errors raised before PIL knows the format)."""
    magic = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP"}
    return next((name for m, name in magic.items() if data.startswith(m)), "image")


def _decode_error(fmt: str, e: Exception) -> str:
    msg = str(e) or type(e).__name__
    if "truncated" in msg.lower():
        return f"truncated {fmt}: {msg}"
    return f"corrupt {fmt}: {type(e).__name__}: {msg}"


def prepare_image(data: bytes, *, max_side: int, jpeg_quality: int, max_pixels: int, encode: bool = True) -> Prepared:
    """Verify one image (full decode) and return the bytes to store, or a skip reason (``encode=False``: the
    verification only, nothing re-encoded; :func:`localmim.data.raw.imagefile.check_image_file` uses it).

    An RGB JPEG within ``max_side`` is stored as is; it is verified by decoding in PIL's JPEG *draft* mode
    (DCT scaling 1/8: every entropy-coded segment is still read, so truncation and corruption are still
    detected, at a fraction of the cost). Anything else decodable (PNG, CMYK/grayscale JPEG, ...) is
    converted to RGB, downscaled when ``max_side`` asks for it, and re-encoded as JPEG.
    """
    if not data:
        return Prepared(skip="zero-byte file")
    with _own_bomb_check():
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            return Prepared(skip="not an image: cannot identify image file")
        except Exception as e:  # noqa: BLE001 - any header parse failure is a property of the file
            return Prepared(skip=_decode_error(sniff_format(data), e))
        w, h = im.size
        if w * h > max_pixels:
            return Prepared(skip=f"decompression bomb: {w}x{h} px > limit {max_pixels}")
        fmt, mode = im.format, im.mode
        downscale = max_side > 0 and max(w, h) > max_side
        try:
            if fmt == "JPEG" and mode == "RGB" and not downscale:
                im.draft("RGB", (1, 1))
                im.load()
                return Prepared(jpg=data, size=(w, h))
            reasons = [f"{fmt} file" if fmt != "JPEG" else f"{mode} JPEG"] if (fmt, mode) != ("JPEG", "RGB") else []
            if downscale:
                s = max_side / max(w, h)
                target = (max(1, round(w * s)), max(1, round(h * s)))
                im.draft("RGB", target)  # JPEG: decode at the smallest DCT scale >= target
                im = im.convert("RGB").resize(target, Image.BICUBIC)
                reasons.append("downscaled")
            else:
                im = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - decode failures (truncated, corrupt data) are per-file
            return Prepared(skip=_decode_error(fmt, e))
    if not encode:
        return Prepared(size=im.size, reencoded=", ".join(reasons))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=jpeg_quality)
    return Prepared(jpg=buf.getvalue(), size=im.size, reencoded=", ".join(reasons))

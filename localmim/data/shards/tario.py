"""The one tar reader and the one tar writer of the data layer (WebDataset shard format).

Reading: :func:`iter_tar_members` parses ustar/PAX/GNU headers over ``mmap``; :func:`tar_samples` groups the
members into WebDataset samples (webdataset's rule: members ``<dir/>key.ext`` with the same key in a row form a
sample) and is the tar stage of every ``webdataset.DataPipeline`` in :mod:`localmim.data.shards.stream`. It replaces
webdataset's own ``tarfile_samples`` because that one costs ~60 us per sample against ~7.5 us here (3 members per
sample; benchmarks/RESULTS.md): about 10% of the whole decode + augment cost of a small image.

Writing: :func:`tar_members` serializes one sample (run in worker processes, so the writer only appends bytes)
and :class:`ShardSink` appends samples to rolling shards under temporary names, renamed into place when full,
with their sha256 and counts. Both the ImageFolder packer (:mod:`.write`) and the view writer
(:mod:`localmim.data.views`) write through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from localmim.utils.io import tmp_name

TAR_BLOCK, TAR_RECORD = 512, 10240  # tar pads members to blocks and the archive to records


# ---------------------------------------------------------------------------------------------------- reading


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _checksum_ok(hdr: bytes) -> bool:
    """tar's header check: the unsigned byte sum of the 512 bytes, the 8-byte checksum field counted as spaces,
    equals the octal number stored in that field.

    The byte sum is taken in C, as the first half of ``zlib.adler32``: 1 + the byte sum, modulo 65521 (RFC 1950).
    So the check is exact modulo 65521: a header with fewer than 257 changed bytes (a change of at most
    256 * 255 = 65280 < 65521) fails it exactly when it fails the full sum. Summing the bytes in Python costs
    1.6 us per header, ten times as much, with three headers per sample (benchmarks/RESULTS.md, bench_shards).
    """
    field = hdr[148:156]
    calc = (zlib.adler32(hdr) & 0xFFFF) - 1 - sum(field) + 8 * 32
    return (calc - _octal(field)) % 65521 == 0


def _header(hdr: bytes, path: str | Path, pos: int) -> tuple[bytes, int, bytes]:
    """(type flag, size, name) of one 512-byte header; ValueError on a bad checksum."""
    if not _checksum_ok(hdr):
        raise ValueError(f"{path}: bad tar header checksum at byte {pos}")
    name = hdr[0:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar" and hdr[345] != 0:
        name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
    return hdr[156:157], _octal(hdr[124:136]), name


def iter_tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar, in order.

    Header checksums are verified; PAX ``path``/``size`` records and GNU long names are honoured, other member
    types (directories, links, global headers) are skipped.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos, end, pax = 0, len(mm), {}
            while pos + TAR_BLOCK <= end:
                hdr = mm[pos : pos + TAR_BLOCK]
                if hdr[0] == 0 and hdr.count(0) == TAR_BLOCK:
                    return  # end-of-archive blocks
                kind, size, name = _header(hdr, path, pos)
                size = int(pax.get(b"size", size))
                name = pax.get(b"path", name)
                data_at = pos + TAR_BLOCK
                pos = data_at + -(-size // TAR_BLOCK) * TAR_BLOCK
                if kind in (b"0", b"\0", b"7"):
                    pax = {}
                    yield name.decode("utf-8", "surrogateescape"), mm[data_at : data_at + size]
                elif kind == b"x":  # PAX header for the next member: "<len> <key>=<value>\n" records
                    recs = mm[data_at : data_at + size]
                    pax = dict(r.split(b" ", 1)[1].split(b"=", 1) for r in recs.split(b"\n") if b"=" in r)
                elif kind == b"L":  # GNU long name for the next member
                    pax = {b"path": mm[data_at : data_at + size].rstrip(b"\0")}
                elif kind != b"g":
                    pax = {}


def iter_samples(url: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one shard, in order (extensions lower-cased)."""
    sample: dict[str, Any] = {}
    for name, data in iter_tar_members(url):
        d, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        key = f"{d}/{stem}" if d else stem
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": str(url)}
        sample[ext.lower()] = data
    if sample:
        yield sample


def tar_samples(shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset pipeline stage: shard dicts ``{"url": ...}`` -> their raw samples, shard after shard."""
    for shard in shards:
        yield from iter_samples(shard["url"])


def count_samples_in(url: str | Path) -> int:
    return sum(1 for _ in iter_samples(url))


# ---------------------------------------------------------------------------------------------------- writing


def tar_members(key: str, fields: dict[str, bytes]) -> bytes:
    """One WebDataset sample as consecutive tar members ``<key>.<ext>`` (extensions sorted, as webdataset's
    TarWriter writes them): ustar header + data padded to 512-byte blocks, fixed metadata (mtime 0, uid/gid 0,
    uname/gname ``localmim``, mode 0444) so identical input gives identical bytes."""
    out = []
    for ext in sorted(fields):
        data = fields[ext]
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o444, "localmim", "localmim"
        out += [ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), data, bytes(-len(data) % TAR_BLOCK)]
    return b"".join(out)


def tar_file_bytes(members: int) -> int:
    """Size of a finished tar whose members take ``members`` bytes (two zero end blocks, then zero padding to a
    multiple of the 10240-byte record, as ``tarfile`` and GNU tar write it)."""
    return -(-(members + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


class _Shard:
    """One shard being written: members appended to a temp file, renamed to its final name by :meth:`finish`."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, tmp_name(path)
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.num_samples, self.member_bytes = 0, 0

    def write(self, members: bytes) -> None:
        self.file.write(members)
        self.hash.update(members)
        self.num_samples += 1
        self.member_bytes += len(members)

    def finish(self) -> dict[str, Any]:
        end = bytes(tar_file_bytes(self.member_bytes) - self.member_bytes)
        self.file.write(end)
        self.hash.update(end)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        nbytes = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        sha = self.hash.hexdigest()
        return {"name": self.path.name, "num_samples": self.num_samples, "bytes": nbytes, "sha256": sha}

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardSink:
    """Rolling shards ``directory/<prefix>-NNNNNN.tar``: a new shard starts when the current one holds
    ``max_samples`` samples or the next sample would make it larger than ``max_bytes`` (a sample larger than
    that still gets a shard of its own). Finished shards are in :attr:`shards` (``{name, num_samples, bytes,
    sha256}``); use as a context manager so that an error removes the unfinished shard."""

    def __init__(self, directory: str | Path, prefix: str, max_samples: int, max_bytes: int = 1 << 62):
        self.dir, self.prefix, self.max_samples, self.max_bytes = Path(directory), prefix, max_samples, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._cur: _Shard | None = None

    def write(self, members: bytes) -> None:
        """Append one sample, already serialized by :func:`tar_members`."""
        cur = self._cur
        if cur is not None and (cur.num_samples >= self.max_samples
                                or tar_file_bytes(cur.member_bytes + len(members)) > self.max_bytes):  # fmt: skip
            self.shards.append(cur.finish())
            cur = self._cur = None
        if cur is None:
            cur = self._cur = _Shard(self.dir / f"{self.prefix}-{len(self.shards):06d}.tar")
        cur.write(members)

    def close(self) -> list[dict[str, Any]]:
        """Finish the current shard; returns every shard record."""
        if self._cur is not None:
            self.shards.append(self._cur.finish())
            self._cur = None
        return self.shards

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._cur is not None:
            self._cur.abort()
            self._cur = None

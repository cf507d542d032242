"""The tar layer under the shards: the fast tar reader and header checksum against tarfile, our shard writer
against webdataset's TarWriter, and the ordered worker map of the shard writer (order, bounded work, clean stop)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter

import numpy as np
import pytest

from localmim.data.shards import tario
from localmim.data.shards import write as sh
from localmim.data.shards.manifest import shard_set
from localmim.utils.parallel import ordered_map
from tests.shard_data import (
    make_good_folder,
    read_tars,
)

# ---------------------------------------------------------------------------------------------------- tar reader


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "PAX_FORMAT", "GNU_FORMAT"])
def test_fast_tar_reader_matches_tarfile(tmp_path, fmt):
    """The tar reader against the standard library on long, prefixed and non-ASCII names (PAX / GNU headers)."""
    rng = np.random.default_rng(0)
    names = ["a/k1.jpg", "a/k1.json", "k2.cls", "d" * 90 + "/" + "e" * 60 + ".jpg", "ünï/名前.txt",
             "x" * 120 + ".json", "empty.bin"]  # fmt: skip
    if fmt == "USTAR_FORMAT":
        names = [n for n in names if n.isascii() and len(n.rsplit("/", 1)[-1]) <= 100 and len(n) < 250][:-2]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tf:
        if fmt != "USTAR_FORMAT":
            d = tarfile.TarInfo("dir_entry")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)  # not a file: skipped by both readers
        for n in names:
            data = rng.bytes(int(rng.integers(0, 3000))) if n != "empty.bin" else b""
            ti = tarfile.TarInfo(n)
            ti.size, ti.mtime = len(data), 1.5 if fmt == "PAX_FORMAT" else 0
            tf.addfile(ti, io.BytesIO(data))
    with tarfile.open(path) as tf:
        ref = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    assert list(tario.iter_tar_members(path)) == ref
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        list(tario.iter_tar_members(path))


def test_header_checksum_agrees_with_tarfile_for_up_to_256_changed_bytes():
    """The C-speed checksum (adler32's byte sum, modulo 65521) decides as the standard library's full byte sum
    (``tarfile.calc_chksums``) on headers with 1..256 changed bytes, including permuted bytes (the sum kept), which
    both must accept; its documented blind spot, a 257+-byte change of exactly 65521, is the one it passes."""
    rng = np.random.default_rng(0)
    ti = tarfile.TarInfo("n01440764/n01440764_10026.jpg")
    ti.size = 123_456
    good = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")

    def full_sum_ok(hdr: bytes) -> bool:
        return tarfile.nti(hdr[148:156]) in tarfile.calc_chksums(hdr)[:1]  # unsigned sum, as tar writes it

    assert full_sum_ok(good) and tario._checksum_ok(good)
    decided = Counter()
    for k in [1, 2, 3, 8, 64, 256] * 40:
        hdr = bytearray(good)
        at = rng.choice(np.r_[0:148, 156:512], size=k, replace=False)
        if rng.random() < 0.3:  # permute the chosen bytes: the sum is kept, both must accept
            for i, j in zip(at, rng.permutation(at), strict=True):
                hdr[i] = good[j]
        else:
            hdr[at[0]] = (hdr[at[0]] + int(rng.integers(1, 256))) % 256
            for i in at[1:]:
                hdr[i] = int(rng.integers(0, 256))
        decided[full_sum_ok(bytes(hdr))] += 1
        assert tario._checksum_ok(bytes(hdr)) == full_sum_ok(bytes(hdr)), (k, at[:4])
    assert decided[True] > 10 and decided[False] > 100  # both outcomes were exercised
    blind = bytearray(good)
    zeros = [i for i in range(512) if good[i] == 0 and not 148 <= i < 156][:257]
    for i in zeros:  # 257 bytes 0 -> 255, one of them 0 -> 241: the sum grows by 257 * 255 - 14 = 65521
        blind[i] = 255
    blind[zeros[0]] = 241
    assert not full_sum_ok(bytes(blind)) and tario._checksum_ok(bytes(blind))


def test_samples_from_our_shards_match_tarfile(tmp_path):
    from localmim.data.shards.stream import raw_samples

    src, out = tmp_path / "src", tmp_path / "out"
    make_good_folder(src, classes=2, per_class=4)
    sh.write_shards(src, out, "train", sh.ShardOptions(max_samples_per_shard=3, workers=1), progress=False)
    ours = [{k: v for k, v in s.items() if k != "__url__"} for s in raw_samples(shard_set(out, "train"))]
    ref = [{k: v for k, v in s.items() if k != "__shard__"} for s in read_tars(out)]
    assert ours == ref and len(ref) == 8


def test_shard_sink_matches_webdataset_tarwriter(tmp_path):
    """Our writer's bytes equal webdataset's TarWriter with the same fixed metadata, and roll over at limits."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i:03d}", "jpg": rng.bytes(int(rng.integers(1, 3000))), "cls": b"%d" % i}
               for i in range(7)]  # fmt: skip
    with tario.ShardSink(tmp_path, "s", max_samples=3) as sink:
        for x in samples:
            sink.write(tario.tar_members(x["__key__"], {k: v for k, v in x.items() if k != "__key__"}))
    assert [r["num_samples"] for r in sink.shards] == [3, 3, 1]
    for r, start in zip(sink.shards, (0, 3, 6), strict=True):
        ref = tmp_path / f"ref-{start}.tar"
        with wds.TarWriter(str(ref), user="localmim", group="localmim", mtime=0) as w:
            for x in samples[start : start + 3]:
                w.write(x)
        mine = (tmp_path / r["name"]).read_bytes()
        assert mine == ref.read_bytes() and r["bytes"] == len(mine)
        assert r["sha256"] == hashlib.sha256(mine).hexdigest()


def test_ordered_map_keeps_order_and_bounds_work_in_flight():
    """Memory independent of dataset size: the pool never runs more than the window ahead of the consumer."""
    consumed = 0

    def items():
        nonlocal consumed
        for i in range(400):
            consumed += 1
            yield i

    ahead = []
    for k, r in enumerate(ordered_map(abs, items(), workers=2, window=32, chunksize=4)):
        assert r == k
        ahead.append(consumed - k)
    assert max(ahead) <= 32 + 1 and consumed == 400


def test_ordered_map_stops_cleanly_when_the_consumer_stops_early():
    """on_bad=fail stops consuming mid-stream: the pool must shut down, not wait for the throttled feeder."""
    import threading

    done = threading.Event()

    def run():
        g = ordered_map(abs, iter(range(100_000)), workers=2, window=16, chunksize=2)
        assert [r for _, r in zip(range(5), g, strict=False)] == [0, 1, 2, 3, 4]
        g.close()
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert done.is_set(), "pool shutdown hung"

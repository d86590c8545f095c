"""Pieces of the preprocessing job that need no Ray: shard packing, statistics, tar format, redaction."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.plan import pack_shards
from pipeline.shards import Sample, ShardWriter, decode_npy, iter_samples, iter_tar_samples, make_key, npy_view
from pipeline.sources.base import WorkItem
from pipeline.stats import BandMoments, HalfSums, IntegerSums
from pipeline.storage import redact, redact_argv, redact_url


def _items(sizes):
    return [WorkItem(f"k{i}", f"s{i}", None, {}, s) for i, s in enumerate(sizes)]


def test_pack_shards_respects_size_and_count_caps_and_keeps_order():
    items = _items([10] * 25)
    shards = pack_shards(items, shard_bytes=35, max_samples=100)
    assert [len(s) for s in shards] == [3] * 8 + [1]
    assert [it.key for s in shards for it in s] == [it.key for it in items]
    assert [len(s) for s in pack_shards(items, shard_bytes=10**9, max_samples=4)] == [4] * 6 + [1]
    # an item larger than the cap still gets a shard of its own rather than being dropped
    assert [len(s) for s in pack_shards(_items([50, 5, 5]), shard_bytes=20, max_samples=10)] == [1, 2]


@pytest.mark.parametrize("pieces", [1, 3, 7])
def test_band_moments_merge_equals_numpy(pieces):
    rng = np.random.default_rng(0)
    x = (rng.normal(3000, 800, size=(pieces * 4, 3, 16, 16))).astype(np.int16)
    valid = rng.random(x.shape) > 0.1
    total = BandMoments.zeros(3)
    for chunk, vchunk in zip(np.array_split(x, pieces), np.array_split(valid, pieces)):
        for sample, v in zip(chunk, vchunk):
            total = total.merge(BandMoments.of(sample, v))
    for b in range(3):
        ref = x[:, b][valid[:, b]].astype(np.float64)
        assert total.count[b] == ref.size
        np.testing.assert_allclose(total.mean[b], ref.mean(), rtol=1e-12)
        np.testing.assert_allclose(total.std[b], ref.std(), rtol=1e-10)
    again = BandMoments.from_dict(json.loads(json.dumps(total.to_dict())))
    np.testing.assert_array_equal(again.mean, total.mean)


def exact_reference(x: np.ndarray, nodata: int) -> tuple[list[int], list[float], list[float]]:
    """Count, mean and M2 per band over the pixels != nodata: int64 sums (exact at these sizes), then fractions."""
    from fractions import Fraction

    counts, means, m2s = [], [], []
    for b in range(x.shape[1]):
        v = x[:, b][x[:, b] != nodata].astype(np.int64)
        n, total, squares = v.size, int(v.sum()), int((v * v).sum())
        counts.append(n)
        means.append(float(Fraction(total, n)) if n else 0.0)
        m2s.append(float(Fraction(n * squares - total * total, n)) if n else 0.0)
    return counts, means, m2s


@pytest.mark.parametrize("dtype,nodata,low,high,side", [
    (np.uint16, 0, 0, 65535, 40),     # S2 digital numbers, no-data 0, the full 16-bit range
    (np.int16, 0, -1000, 12000, 40),  # offset removed: negative values, no-data still 0
    (np.uint16, 7, 0, 40, 40),        # a non-zero no-data value, also drawn at random among the values
    (np.uint16, 0, 0, 65535, 1500),   # 2.25 M pixels a band: past exact float64 sums, the int64 path
])
def test_integer_sums_are_exact(dtype, nodata, low, high, side):
    rng = np.random.default_rng(3)
    x = rng.integers(low, high, size=(2, 3, side, side), endpoint=True).astype(dtype)
    x[:, 1, :5] = nodata
    x[:, 2] = nodata  # a band with no valid pixel at all
    sums = IntegerSums(3, nodata)
    for sample in x:
        sums.add(sample)
    got = sums.moments()
    counts, means, m2s = exact_reference(x, nodata)
    # exact: the correctly rounded mean and M2 of the exact rational values, bit for bit
    assert got.count.tolist() == counts and counts[2] == 0 and 0 < counts[1] < counts[0]
    assert got.mean.tolist() == means and got.m2.tolist() == m2s
    # and numpy's float64 over the valid pixels, to its rounding
    for b in (0, 1):
        ref = x[:, b][x[:, b] != nodata].astype(np.float64)
        np.testing.assert_allclose(got.std[b], ref.std(), rtol=1e-12)


def test_integer_sums_take_16_bit_integers_only():
    # wider integers or floats go through BandMoments.of (float64 with a mask)
    assert IntegerSums.supports(np.zeros(1, np.uint16)) and IntegerSums.supports(np.zeros(1, np.int16))
    assert not IntegerSums.supports(np.zeros(1, np.int32)) and not IntegerSums.supports(np.zeros(1, np.float32))
    for shape in ((3, 2, 2), (4,)):  # more bands than the sums have, or no band axis: refused, nothing counted
        sums = IntegerSums(1, 0)
        with pytest.raises(ValueError, match=r"C = 1, got shape"):
            sums.add(np.ones(shape, np.uint16))
        assert (sums.count, sums.total, sums.squares) == ([0], [0], [0])


def test_shard_writer_is_deterministic_and_readable_by_plain_webdataset(tmp_path):
    rng = np.random.default_rng(1)
    samples = [
        Sample(make_key("0000001", f"t{t}"), rng.normal(size=(2, 8, 8)).astype(np.float16),
               rng.integers(0, 10000, size=(13, 8, 8)).astype(np.int16), {"sample_id": "0000001", "time_index": t})
        for t in range(3)
    ]
    paths = [tmp_path / "a.tar", tmp_path / "b.tar"]
    digests = []
    for p in paths:
        with ShardWriter(str(p)) as w:
            for s in samples:
                w.write(s)
        digests.append(w.sha256)
        assert w.bytes == p.stat().st_size and w.samples == 3
    assert digests[0] == digests[1] and paths[0].read_bytes() == paths[1].read_bytes()
    assert digests[0] == hashlib.sha256(paths[0].read_bytes()).hexdigest()

    # Every header field that could vary between runs or machines is fixed (read back by the standard
    # library, not by the writer): the members of each sample in MEMBERS order.
    with tarfile.open(paths[0]) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [f"{s.key}.{ext}" for s in samples for ext in ("json", "s1.npy", "s2.npy")]
    assert {(i.mtime, i.mode, i.uid, i.gid, i.uname, i.gname, i.type) for i in infos} == {
        (0, 0o644, 0, 0, "", "", tarfile.REGTYPE)}
    # The offsets the writer records (the sample index's) are each sample's first header.
    assert [(k, off) for k, off, _ in w.rows] == [(infos[3 * i].name.split(".")[0], infos[3 * i].offset)
                                                  for i in range(3)]

    got = list(wds.WebDataset(str(paths[0]), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples):
        np.testing.assert_array_equal(g["s1.npy"], s.s1)
        assert g["s2.npy"].dtype == np.int16
        assert g["json"]["time_index"] == s.meta["time_index"]
    with open(paths[0], "rb") as f:
        raw = list(iter_tar_samples(f))
    assert decode_npy(raw[1]["s2.npy"]).shape == (13, 8, 8)


def test_shard_writer_rejects_duplicate_and_invalid_keys(tmp_path):
    s = Sample("abc", np.zeros((2, 2, 2), np.float32), np.zeros((13, 2, 2), np.int16), {})
    with ShardWriter(str(tmp_path / "x.tar")) as w:
        w.write(s)
        with pytest.raises(ValueError, match="duplicate"):
            w.write(s)
        with pytest.raises(ValueError, match="invalid"):
            w.write(Sample("a.b", s.s1, s.s2, {}))
    assert make_key("S2A_MSIL2A.x", "t1") == "S2A_MSIL2A_x_t1"


def test_redaction():
    opts = {"key": "AKIA123", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x", "region_name": "r"},
            "aws_session_token": "tok"}
    out = redact(opts)
    assert out["key"] == out["secret"] == out["aws_session_token"] == "***"
    assert out["client_kwargs"] == opts["client_kwargs"]
    assert "AKIA" not in redact_url("s3://AKIA:secret@bucket/x") and redact_url("s3://bucket/x") == "s3://bucket/x"
    argv = ["--input", "s3://u:pw@b/x", "--storage-options", '{"secret": "zz", "anon": false}', "--token", "abc",
            "--aws-secret-key=q"]
    text = " ".join(redact_argv(argv))
    for secret in ("pw@", "zz", "abc", "=q"):
        assert secret not in text
    assert '"anon": false' in text


class _CountingReader:
    """A seekable binary file that counts the bytes read through it."""

    def __init__(self, f):
        self.f, self.read_bytes = f, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()


def test_iter_samples_reads_only_the_requested_members(tmp_path):
    path = tmp_path / "s.tar"
    with ShardWriter(str(path)) as w:
        for i in range(3):  # s2: 13 x 64 x 64 int16 = 106,496 bytes per sample, json a few bytes
            w.write(Sample(f"k{i}", np.full((2, 64, 64), i, np.float16), np.full((13, 64, 64), i, np.int16),
                           {"index": i}))
    with open(path, "rb") as raw:
        f = _CountingReader(raw)
        got = list(iter_samples(f, read={"json"}))
    assert [key for key, _, _ in got] == ["k0", "k1", "k2"]
    for i, (_, _, members) in enumerate(got):
        assert set(members) == {"json", "s1.npy", "s2.npy"}
        assert members["s1.npy"] is None and members["s2.npy"] is None
        assert json.loads(members["json"]) == {"index": i}
    assert got[0][1] == 0
    assert f.read_bytes < 20_000 < path.stat().st_size  # headers and json only, not the 3 x 123 kB of arrays

    # a sample's offset is where a later read of it starts; without `read` every member is read
    with open(path, "rb") as f:
        f.seek(got[2][1])
        again = list(iter_samples(f))
    assert [key for key, _, _ in again] == ["k2"]
    np.testing.assert_array_equal(npy_view(again[0][2]["s2.npy"]), np.full((13, 64, 64), 2, np.int16))
    assert npy_view(again[0][2]["s1.npy"]).dtype == np.float16


@pytest.mark.parametrize("background", [True, False], ids=["writer-thread", "calling-thread"])
def test_shard_writer_writes_the_bytes_webdatasets_tar_writer_writes(tmp_path, background):
    # The writer makes its headers from a template (tarfile's where it writes a pax header) and writes the arrays
    # straight from memory; the format is still exactly what webdataset's own writer makes of the same members,
    # names of 100 bytes (the last a ustar block holds) and of 101 and more (pax) included, whether the bytes are
    # hashed and written on the writer's thread (the default) or in the caller's.
    rng = np.random.default_rng(2)
    samples = [Sample(make_key("k" * [5, 60, 130, 90, 92][i % 5], f"t{i}"), rng.normal(size=(2, 8, 9)).astype(np.float16),
                      rng.integers(0, 9000, (3, 8, 9)).astype(np.uint16), {"i": i, "label_vector": [i % 2, 1]})
               for i in range(10)]
    samples.append(Sample("big", rng.normal(size=(2, 264, 264)).astype(np.float16),  # hashed outside the GIL
                          rng.integers(0, 9000, (3, 264, 264)).astype(np.uint16), {"i": 7}))
    with ShardWriter(str(tmp_path / "ours.tar"), background=background, pending=2) as w:
        assert bool(_writer_threads()) == background  # the bytes below come from the thread when there is one
        for s in samples:
            w.write(s)
    reference = io.BytesIO()
    with wds.TarWriter(reference, user="", group="", mode=0o644, mtime=0, encoder=False) as tw:
        for s in samples:
            tw.write({"__key__": s.key, **{name[len(s.key) + 1:]: data for name, data in s.members()}})
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == reference.getvalue() and w.bytes == len(ours) and w.sha256 == hashlib.sha256(ours).hexdigest()
    assert len(samples[2].key) > 100  # a pax header: the offsets recorded still point at each sample's first header
    assert len(f"{samples[4].key}.json") == 100 and len(f"{samples[4].key}.s1.npy") == 102  # ustar, then pax
    with tarfile.open(tmp_path / "ours.tar") as tar:
        firsts = [m.offset for m in tar.getmembers() if m.name.endswith(".json")]
    assert [off for _, off, _ in w.rows] == firsts


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("shard-writer")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_write_error_on_the_writer_thread_reaches_the_caller_with_its_errno():
    # /dev/full fails every write that reaches it with ENOSPC, as a full disk does: the thread's error is
    # raised in the caller's thread (by a later write or by close, whichever comes first), names the shard,
    # keeps its errno, and no sha256 is given for bytes that never reached the file.
    rng = np.random.default_rng(3)
    big = Sample("a", rng.normal(size=(2, 264, 264)).astype(np.float16),
                 rng.integers(0, 9000, (13, 264, 264)).astype(np.uint16), {})
    before = _writer_threads()
    with pytest.raises(OSError) as err:
        with ShardWriter("/dev/full", pending=1) as w:
            for i in range(50):
                w.write(Sample(f"k{i}", big.s1, big.s2, {}))
    assert err.value.errno == errno.ENOSPC and "writing shard /dev/full" in str(err.value)
    assert w.sha256 is None and _writer_threads() == before
    with pytest.raises(ValueError, match="closed"):
        w.write(big)


def test_an_error_in_the_with_body_stops_the_writer_thread_and_is_the_one_raised(tmp_path):
    s = Sample("a", np.zeros((2, 4, 4), np.float16), np.zeros((13, 4, 4), np.uint16), {"x": float("nan")})
    before = _writer_threads()
    with pytest.raises(ValueError, match="Out of range float values"):  # json refuses NaN in the metadata
        with ShardWriter(str(tmp_path / "x.tar")) as w:
            w.write(Sample("ok", s.s1, s.s2, {}))
            w.write(s)
    assert _writer_threads() == before
    # the refused sample left nothing behind: one sample, its row only
    assert w.samples == 1 and [k for k, _, _ in w.rows] == ["ok"] and w.keys == {"ok"}
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert [m.name for m in tar.getmembers()] == ["ok.json", "ok.s1.npy", "ok.s2.npy"]


@pytest.mark.parametrize("dtype", [">u2", "<i2", "u1", "i1"])
def test_integer_sums_take_any_byte_order_layout_and_width(dtype, monkeypatch):
    # big-endian and strided inputs, 8-bit integers, and bands summed in pieces (PIECE made small here:
    # the real loop, which at full size starts past 2^31 pixels a band)
    rng = np.random.default_rng(5)
    info = np.iinfo(np.dtype(dtype))
    x = rng.integers(info.min, info.max, size=(2, 3, 30, 41), endpoint=True).astype(dtype)[:, :, ::2, 1:]
    assert not x[0].flags.c_contiguous
    nodata = int(x[0, 0, 0, 0])
    for piece in (IntegerSums.PIECE, 7):
        monkeypatch.setattr(IntegerSums, "PIECE", piece)
        sums = IntegerSums(3, nodata)
        for sample in x:
            sums.add(sample)
            assert sums._pixels <= piece  # folded before the int64 accumulators could take more than PIECE pixels
        got = sums.moments()
        counts, means, m2s = exact_reference(x, nodata)
        assert got.count.tolist() == counts and got.mean.tolist() == means and got.m2.tolist() == m2s


@pytest.mark.parametrize("nodata", [-1, 70000])
def test_integer_sums_with_a_nodata_value_the_type_cannot_hold_count_every_pixel(nodata):
    x = np.array([[[0, 1], [65535, 2]]], np.uint16)
    sums = IntegerSums(1, nodata)
    sums.add(x)
    assert (sums.count, sums.total, sums.squares) == ([4], [65538], [65535**2 + 5])


@pytest.mark.parametrize("dtype", [np.float16, ">f2", np.float32])
@pytest.mark.parametrize("holes", [False, True])
def test_band_moments_of_finite_equals_the_masked_moments_bit_for_bit(dtype, holes):
    rng = np.random.default_rng(6)
    x = rng.normal(-12, 4, size=(2, 33, 35)).astype(dtype)
    if holes:
        x[0, :3] = np.nan
        x[1, 5, 5] = np.inf
        x[1, 6, 6] = -np.inf
    got = BandMoments.of_finite(x)
    want = BandMoments.of(x, np.isfinite(x))
    assert got.count.tolist() == want.count.tolist() == ([33 * 35 - 3 * 35, 33 * 35 - 2] if holes else [33 * 35] * 2)
    assert got.mean.tolist() == want.mean.tolist() and got.m2.tolist() == want.m2.tolist()
    ref = x[1][np.isfinite(x[1])].astype(np.float64)
    np.testing.assert_allclose(got.std[1], ref.std(), rtol=1e-12)


def half_reference(x):
    """Count, mean and M2 per band of x (S, C, H, W) over its finite pixels, from exact rationals."""
    from fractions import Fraction

    counts, means, m2s = [], [], []
    for b in range(x.shape[1]):
        v = [Fraction(float(e)) for e in x[:, b][np.isfinite(x[:, b])].ravel().tolist()]
        n = len(v)
        mean = sum(v, Fraction(0)) / n if n else Fraction(0)
        counts.append(n)
        means.append(float(mean))
        m2s.append(float(sum(((e - mean) ** 2 for e in v), Fraction(0))) if n else 0.0)
    return counts, means, m2s


@pytest.mark.parametrize("dtype", ["<f2", ">f2"])
def test_half_sums_are_exact_over_every_half_precision_value(dtype):
    # Every float16 bit pattern once (subnormals, -0, the extremes +-65504, NaNs and infinities), in band 0 as is, in
    # band 1 read through a stride, plus a band that is all NaN: the counting must agree with np.isfinite exactly and
    # the mean and M2 be those of the exact rational values, rounded once.
    every = np.arange(2**16, dtype=np.uint16).view(np.float16)
    x = np.empty((2, 3, 256, 256), dtype)
    x[0, 0] = every.reshape(256, 256)
    x[1, 0] = every[::-1].reshape(256, 256)
    x[:, 1] = np.random.default_rng(8).normal(-12, 5, size=(2, 256, 256))
    x[:, 2] = np.nan
    sums = HalfSums(3)
    for sample in x:
        sums.add(sample)
    got = sums.moments()
    counts, means, m2s = half_reference(x)
    assert got.count.tolist() == counts == [2 * (2**16 - 2 * 2**10), 2 * 2**16, 0]
    assert got.mean.tolist() == means and got.m2.tolist() == m2s
    ref = x[:, 1].astype(np.float64).ravel()
    np.testing.assert_allclose(got.mean[1], ref.mean(), rtol=1e-12)
    np.testing.assert_allclose(got.std[1], ref.std(), rtol=1e-12)
    strided = HalfSums(3)
    for sample in np.ascontiguousarray(x[:, :, :, ::-1])[:, :, :, ::-1]:  # negative strides
        strided.add(sample)
    assert strided.hist.tolist() == sums.hist.tolist()


def test_half_sums_past_the_int64_bounds_of_the_grouped_sums_stay_exact():
    # Counts of 2^31 and more a pattern (a shard of many large tiles of one value) take the Python-int path; below
    # that the grouped int64 sums give the same bits.
    from fractions import Fraction

    rng = np.random.default_rng(9)
    sums = HalfSums(2)
    sums.add(rng.normal(-12, 5, size=(2, 64, 64)).astype(np.float16))
    assert sums.moments().mean.tolist() == sums._moments_in_python_ints().mean.tolist()
    assert sums.moments().m2.tolist() == sums._moments_in_python_ints().m2.tolist()
    big = np.float16(-65504.0).view(np.uint16), np.float16(2.0**-24).view(np.uint16), np.float16(3.5).view(np.uint16)
    sums.hist[1, big[0]] += 2**40
    sums.hist[1, big[1]] += 2**33
    sums.hist[1, big[2]] += 3
    got = sums.moments()
    values = [(int(k), Fraction(float(np.uint16(i).view(np.float16)))) for i, k in enumerate(sums.hist[1]) if k]
    n = sum(k for k, _ in values)
    mean = sum(k * v for k, v in values) / n
    assert got.count[1] == n and got.mean[1] == float(mean)
    assert got.m2[1] == float(sum(k * (v - mean) ** 2 for k, v in values))


def test_half_sums_take_half_precision_only():
    assert HalfSums.supports(np.zeros(1, np.float16)) and HalfSums.supports(np.zeros(1, ">f2"))
    assert not HalfSums.supports(np.zeros(1, np.float32)) and not HalfSums.supports(np.zeros(1, np.uint16))
    with pytest.raises(TypeError, match="half-precision"):
        HalfSums(1).add(np.zeros((1, 2, 2), np.float32))
    for shape in ((3, 2, 2), (4,)):  # more bands than the histogram has, or no band axis: refused, nothing counted
        sums = HalfSums(1)
        with pytest.raises(ValueError, match=r"C = 1, got shape"):
            sums.add(np.zeros(shape, np.float16))
        assert not sums.hist.any()


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", ">f8"])
def test_count_finite_agrees_with_numpy_on_every_half_precision_value(dtype):
    from pipeline.sources.base import count_finite

    every = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(dtype)  # NaNs, infinities, subnormals, -0
    for x in (every, every.reshape(256, 256)[:, ::3], every.reshape(2, 128, 256)[:, 1:, :]):
        assert count_finite(x) == np.count_nonzero(np.isfinite(x))
    assert count_finite(every) == 2**16 - 2 * 2**10  # exponent all ones: 2 x 1024 infinities and NaNs


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<u2", ">u2", "u1", "i1", "<i4", "<u4", "<i8", "<u8", "<f4"])
def test_any_other_than_agrees_with_numpy(dtype):
    # The compiled scan stops at the first pixel other than the value: it must say what (x != value).any() says
    # wherever that pixel is (first, last, none), for either byte order, strided views and values the type cannot
    # hold, 64-bit ones included (numba would compare uint64 with int64 as float64).
    from pipeline.sources.base import any_other_than

    for value in (0, -1000, 7, 70000, 2**53, 2**53 + 1, 2**63, 2**64 - 1, -2**63):
        fits = np.can_cast(np.min_scalar_type(value), np.dtype(dtype))
        x = np.full((3, 6, 5), value if fits else 0, dtype)
        cases = [x, x[:, ::2, 1:], x[:0]]
        for where in ((0, 0, 0), (2, 5, 4), (1, 3, 2)):
            y = x.copy()
            y[where] = 1 if value != 1 else 2
            if fits and y.dtype.itemsize == 8 and value >= 2**53:  # one apart where float64 cannot tell them apart
                y[where] = value - 1
            cases += [y, y[:, ::-1], y[::2, 1::2]]
        for case in cases:
            assert any_other_than(case, value) == bool((case != value).any()), (case.shape, value)


def test_integer_sums_work_where_numba_cannot_write_its_cache(tmp_path):
    """A read-only install and home folder (a locked-down container): numba has no cache location, and the kernel
    is compiled in memory instead of failing every shard task. Root writes anywhere, so each location is made
    impossible instead: a file where ``__pycache__`` would go, HOME and NUMBA_CACHE_DIR under /dev/null."""
    import shutil

    pkg = tmp_path / "site"
    shutil.copytree(Path(__file__).resolve().parents[2] / "pipeline", pkg / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "pipeline" / "__pycache__").write_text("not a folder")
    code = ("import logging, numpy as np; logging.basicConfig(level=logging.INFO)\n"
            "from pipeline.stats import IntegerSums\n"
            "s = IntegerSums(1, 0); s.add(np.array([[[1, 2], [0, 65535]]], np.uint16))\n"
            "print(s.count, s.total, s.squares)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(pkg), "HOME": "/dev/null/home",
                               "NUMBA_CACHE_DIR": "/dev/null/numba"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == f"[3] [65538] [{1 + 4 + 65535**2}]"
    assert "compiling it in memory" in proc.stderr

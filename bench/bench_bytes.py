"""What a sample costs in the shards, what a GPU needs, and what lossless compression of the members would give.

Makes a shard set with the real pipeline from a synthetic SSL4EO-S12 v1.1 archive at
264 px, then reports:

1. bytes per sample by member (``s1.npy``, ``s2.npy``, ``json``, tar headers and padding);
2. the bandwidth a GPU consuming ``--rate`` samples/s needs from its loader;
3. for lossless codecs of numcodecs (already a dependency: Blosc with zstd / lz4 and
   byte or bit shuffle, zlib), applied to each array: the size against the plain
   ``.npy`` and the decode rate on one thread, beside the loader's cost of a plain
   member (a copy of its bytes). A codec pays off only where the bytes saved per
   second are worth more than the decode time it adds; the synthetic scenes are
   smoother and noisier than real imagery in different places, so the ratios are
   indicative only, and no codec is used by the shards today.

    python bench/bench_bytes.py              # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import hardware, make_shards, print_header, write_json  # noqa: E402
from pipeline.shards import iter_tar_samples, npy_view  # noqa: E402

MB = 1e6


def codecs() -> dict[str, Any]:
    from numcodecs import Blosc, Zlib

    blosc = {"zstd-1 bitshuffle": ("zstd", 1, Blosc.BITSHUFFLE), "zstd-3 shuffle": ("zstd", 3, Blosc.SHUFFLE),
             "lz4-5 shuffle": ("lz4", 5, Blosc.SHUFFLE), "lz4-5 bitshuffle": ("lz4", 5, Blosc.BITSHUFFLE)}
    out: dict[str, Any] = {f"blosc {k}": Blosc(cname=c, clevel=lv, shuffle=sh) for k, (c, lv, sh) in blosc.items()}
    out["zlib-1"] = Zlib(level=1)
    return out


def rate(fn: Callable[[], Any], nbytes: int, seconds: float = 1.0) -> float:
    """MB/s of ``nbytes`` per call of ``fn``, over at least ``seconds``."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls * nbytes / elapsed / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locations", type=int, default=8, help="synthetic locations (4 samples each)")
    parser.add_argument("--rate", type=float, default=4500.0, help="samples/s one GPU consumes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from numcodecs import blosc

    blosc.set_nthreads(1)  # one loader worker = one thread
    with tempfile.TemporaryDirectory(prefix="fusmae-bench-bytes-") as tmp:
        manifest = make_shards(Path(tmp), args.locations, 264)
        folder = manifest.parent
        members: dict[str, int] = {}
        tar_bytes, samples, arrays = 0, 0, []
        for shard in sorted(folder.glob("*.tar")):
            tar_bytes += shard.stat().st_size
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    ext = m.name.split(".", 1)[1]
                    members[ext] = members.get(ext, 0) + m.size
            with open(shard, "rb") as f:
                for sample in iter_tar_samples(f):
                    samples += 1
                    arrays.append({k: np.array(npy_view(sample[f"{k}.npy"])) for k in ("s1", "s2")})
    per_sample = {ext: size / samples for ext, size in members.items()}
    per_sample["tar headers and padding"] = tar_bytes / samples - sum(per_sample.values())
    total = tar_bytes / samples

    rows = []
    sample_arrays = arrays[: min(8, len(arrays))]
    plain = sum(a[k].nbytes for a in sample_arrays for k in ("s1", "s2"))
    copy_rate = rate(lambda: [np.copy(a[k]) for a in sample_arrays for k in ("s1", "s2")], plain)
    for name, codec in codecs().items():
        encoded = [{k: codec.encode(a[k]) for k in ("s1", "s2")} for a in sample_arrays]
        size = sum(len(e[k]) for e in encoded for k in ("s1", "s2"))
        decode = rate(lambda: [codec.decode(e[k]) for e in encoded for k in ("s1", "s2")], plain)
        for e, a in zip(encoded, sample_arrays):  # lossless: every value back
            for k in ("s1", "s2"):
                back = np.frombuffer(codec.decode(e[k]), dtype=a[k].dtype).reshape(a[k].shape)
                assert np.array_equal(back, a[k], equal_nan=True), (name, k)
        rows.append({"codec": name, "size_ratio": size / plain, "decode_mb_s": decode,
                     "decode_s_per_sample": plain / len(sample_arrays) / (decode * MB)})

    setup = {"samples": samples, "size_px": 264, "rate_samples_per_s": args.rate, "codec_threads": 1}
    hw = hardware(packages=("numpy", "numcodecs"))
    print_header("Bytes per sample, GPU bandwidth, lossless member codecs", setup, hw)
    print("| member | bytes per sample | share |")
    print("|---|---:|---:|")
    for ext, b in per_sample.items():
        print(f"| {ext} | {b:,.0f} | {b / total:.1%} |")
    print(f"| **shard bytes per sample** | **{total:,.0f}** | 100% |")
    print(f"\nA GPU at {args.rate:,.0f} samples/s needs {total * args.rate / 1e9:.2f} GB/s of shard bytes from its "
          f"loader ({total * args.rate * 8 / 1e9:.0f} Gbit/s from object storage).")
    print(f"\nCodecs on {len(sample_arrays)} samples' arrays, one thread; a plain member costs the loader a copy "
          f"({copy_rate:,.0f} MB/s here):\n")
    print("| codec | size / plain .npy | decode MB/s (decoded) | decode / plain copy time | "
          f"GB/s needed at {args.rate:,.0f}/s | decode cores needed |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        need = r["size_ratio"] * total * args.rate / 1e9
        cores = r["decode_s_per_sample"] * args.rate
        print(f"| {r['codec']} | {r['size_ratio']:.3f} | {r['decode_mb_s']:,.0f} | {copy_rate / r['decode_mb_s']:.1f}x "
              f"| {need:.2f} | {cores:.1f} |")
    write_json(args.json, {"setup": setup, "hardware": hw, "per_sample": per_sample, "total": total,
                           "copy_mb_s": copy_rate, "codecs": rows})


if __name__ == "__main__":
    main()

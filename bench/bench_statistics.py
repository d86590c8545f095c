"""The exact per-band statistics of one sample: each path the shard tasks take, against the float64 formulation.

Samples are SSL4EO-S12 v1.1-sized (2 x 264 x 264 float16 S1 in dB with a few NaN, 13 x 264 x 264 uint16 S2 with
some no-data), made once; every path is timed over the same samples in this run, interleaved, fastest of
``--repeats``:

- S1, float16: `HalfSums.add` (a histogram of the 16-bit patterns, what the shard tasks do) against
  `BandMoments.of_finite` (a float64 copy, its finiteness, the sum and M2: what they did before);
- S2, uint16: `IntegerSums.add` (compiled int64 sums) against `BandMoments.of` with the no-data mask (float64).

A shard's one-off reduction (`HalfSums.moments`, `IntegerSums.moments`) is timed too, and reported per sample of a
64 MB shard (~30 samples). The kernels are compiled (or loaded from numba's cache) before timing.

    python bench/bench_statistics.py [--samples 200] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import hardware, markdown_table, print_header, write_json  # noqa: E402
from pipeline.stats import BandMoments, HalfSums, IntegerSums  # noqa: E402

SIZE = 264
SAMPLES_PER_SHARD = 30  # 64 MB shards of 2.1 MB samples


def make_samples(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    s1, s2 = [], []
    for _ in range(n):
        a = rng.normal(-12, 5, (2, SIZE, SIZE)).astype(np.float16)
        a[0, :2] = np.nan  # a border without data
        b = rng.integers(1, 12000, (13, SIZE, SIZE), dtype=np.uint16)
        b[:, :, :3] = 0  # no-data (0 in the Zarr release)
        s1.append(a)
        s2.append(b)
    return s1, s2


def time_per_sample(add: Callable[[np.ndarray], Any], arrays: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for x in arrays:
        add(x)
    return (time.perf_counter() - start) / len(arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    s1, s2 = make_samples(args.samples)
    HalfSums(2).add(s1[0])  # compile or load the kernels
    IntegerSums(13, 0).add(s2[0])

    paths: dict[str, tuple[Callable[[], Callable[[np.ndarray], Any]], list[np.ndarray]]] = {
        "s1 HalfSums.add": (lambda: HalfSums(2).add, s1),
        "s1 BandMoments.of_finite": (lambda: BandMoments.of_finite, s1),
        "s2 IntegerSums.add": (lambda: IntegerSums(13, 0).add, s2),
        "s2 BandMoments.of (float64, masked)": (lambda: (lambda x: BandMoments.of(x, x != 0)), s2),
    }
    best = {name: float("inf") for name in paths}
    for _ in range(args.repeats):  # interleaved, so drift hits every path alike
        for name, (make, arrays) in paths.items():
            best[name] = min(best[name], time_per_sample(make(), arrays))
    half, ints = HalfSums(2), IntegerSums(13, 0)
    for a, b in zip(s1[:SAMPLES_PER_SHARD], s2[:SAMPLES_PER_SHARD]):
        half.add(a)
        ints.add(b)
    reduce_s = {"s1 HalfSums.moments": half.moments, "s2 IntegerSums.moments": ints.moments}
    reduce_best = {}
    for name, f in reduce_s.items():
        reduce_best[name] = min(time_per_sample(lambda _: f(), [None]) for _ in range(args.repeats))

    # the exactness this buys: the histogram's moments against numpy's float64 over the same finite pixels
    ref = np.stack(s1[:SAMPLES_PER_SHARD])[:, 0].astype(np.float64)
    ref = ref[np.isfinite(ref)]
    got = half.moments()
    setup = {"samples": args.samples, "repeats": args.repeats, "s1": f"2x{SIZE}x{SIZE} float16",
             "s2": f"13x{SIZE}x{SIZE} uint16"}
    hw = hardware(packages=("numpy", "numba"))
    print_header("Exact statistics of one sample, per path", setup, hw)
    rows = [[name, f"{best[name] * 1e3:.3f}"] for name in paths]
    rows += [[f"{name} (once a shard of {SAMPLES_PER_SHARD}), per sample", f"{t / SAMPLES_PER_SHARD * 1e3:.3f}"]
             for name, t in reduce_best.items()]
    print(markdown_table(["path", "ms per sample"], rows, "lr"))
    s1_ratio = best["s1 BandMoments.of_finite"] / (best["s1 HalfSums.add"]
                                                   + reduce_best["s1 HalfSums.moments"] / SAMPLES_PER_SHARD)
    s2_ratio = best["s2 BandMoments.of (float64, masked)"] / best["s2 IntegerSums.add"]
    print(f"\nS1: the histogram path is {s1_ratio:.1f}x faster than the float64 copy, the shard's reduction "
          f"included; S2: the integer sums are {s2_ratio:.1f}x faster than float64 with a mask.")
    print(f"S1 band 0 over {SAMPLES_PER_SHARD} samples: histogram mean {got.mean[0]!r}, numpy float64 "
          f"{ref.mean()!r} (relative difference {abs(got.mean[0] - ref.mean()) / abs(ref.mean()):.1e}).")
    write_json(args.json, {"setup": setup, "hardware": hw, "ms_per_sample": {k: v * 1e3 for k, v in best.items()},
                           "reduce_ms_per_shard": {k: v * 1e3 for k, v in reduce_best.items()},
                           "s1_speedup": s1_ratio, "s2_speedup": s2_ratio})


if __name__ == "__main__":
    main()

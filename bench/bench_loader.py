"""Training loader throughput, from local shards and from S3, against the source and the training step.

Builds a shard set of 264 x 264 samples (13 + 2 bands, ~2 MB each): by default from a
synthetic SSL4EO-S12 v1.1 Zarr archive (`pipeline.synthetic.make_ssl4eo_zarr`, then
`python -m pipeline.preprocess`), or with `tests/shardfactory.py` (``--source factory``).
Then measures, each for ``--seconds``:

- the source read straight, in one process: the Zarr archive's samples (S1 + S2 cubes
  through xarray, as preprocessing reads them);
- two decode floors of the shards, in one process: the plain one (``tarfile`` members read
  and ``np.load``-ed, as a user would write it) and the strict one (each array member read
  with one ``readinto`` into a reused buffer and viewed with ``np.frombuffer``: one copy
  from the page cache, nothing else);
- `launch.data.loader.ShardLoader` in-process and with each ``--workers`` count, from the
  local folder, and from S3 (a moto server subprocess on loopback, reached through
  AWS_ENDPOINT_URL) with the largest count;
- a Fus-MAE training step (DeviceAugment + forward + backward + AdamW) on a loader batch,

and prints a Markdown table with the ratio of loader supply to training consumption.

    python bench/bench_loader.py                                  # ~1-2 min on 2 cores
    python bench/bench_loader.py --model vit_s --device cuda --json bench/results/loader.json
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

# Runnable as a plain script from any directory: the repository root holds `launch/`, `model/`, `tests/`.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from common import hardware, moto_server, print_header, write_json  # noqa: E402
from launch.data.augment import DeviceAugment  # noqa: E402
from launch.data.loader import LoaderSettings, ShardLoader  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from model import FusMAE, FusMAEConfig  # noqa: E402
from pipeline.shards import npy_view, walk_members  # noqa: E402

MB = 1 << 20


def timed(items: Iterator[int], seconds: float, warmup: int = 1) -> dict[str, float]:
    """Pull sample counts from ``items`` for ``seconds`` after ``warmup`` pulls; samples/s."""
    for _ in range(warmup):
        next(items)
    start, samples = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        samples += next(items)
    return {"samples": samples, "seconds": elapsed, "samples_per_s": samples / elapsed}


def forever(fn: Callable[[], Iterator[int]]) -> Iterator[int]:
    while True:
        yield from fn()


# -- shard sets ---------------------------------------------------------------------------------


def build_synthetic(work: Path, locations: int) -> tuple[str, Path]:
    from pipeline import synthetic

    archive = work / "ssl4eo"
    synthetic.make_ssl4eo_zarr(archive, splits={"train": max(1, locations // 8)}, samples_per_file=min(8, locations),
                               size=264, seed=0, products=("S1GRD", "S2L1C"))
    shards = work / "shards"
    subprocess.run([sys.executable, "-m", "pipeline.preprocess", "--no-progress", "--source", "ssl4eo-zarr",
                    "--input", str(archive), "--output", str(shards), "--split", "train", "--workers", "2",
                    "--shard-size-mb", "32"], cwd=ROOT, check=True, capture_output=True)
    return str(shards / "manifest.json"), archive


def build_factory(work: Path, samples: int) -> tuple[str, None]:
    from shardfactory import make_shard_set

    sizes = [16] * (samples // 16) + ([samples % 16] if samples % 16 else [])
    return make_shard_set(str(work / "shards"), sizes, hw=264, s2_channels=13, s1_dtype="float16"), None


# -- reading the source directly ----------------------------------------------------------------


def zarr_samples(archive: Path) -> Iterator[int]:
    """Every (location, season) sample of the archive: S1 and S2 cubes, as preprocessing reads them."""
    from pipeline.sources.ssl4eo_zarr import open_zarr_zip
    from pipeline.storage import url_to_fs

    fs, _ = url_to_fs(str(archive))
    for s2_path in sorted((archive / "train" / "S2L1C").glob("*.zarr.zip")):
        s1_path = archive / "train" / "S1GRD" / s2_path.name
        ds1, ds2 = open_zarr_zip(fs, str(s1_path)), open_zarr_zip(fs, str(s2_path))
        for i in range(ds2.sizes["sample"]):
            for t in range(ds2.sizes["time"]):
                np.asarray(ds1["bands"][i, t].values)
                np.asarray(ds2["bands"][i, t].values)
                yield 1


def plain_floor(manifest_url: str) -> Iterator[int]:
    """Every sample of the shard set as a user would read it: tarfile members, ``np.load`` of both arrays."""
    folder = Path(manifest_url).parent
    for shard in load_manifest(manifest_url).shards:
        with tarfile.open(folder / shard.name) as tar:
            for member in tar:
                if member.name.endswith(".npy"):
                    np.load(io.BytesIO(tar.extractfile(member).read()))
                    if member.name.endswith(".s2.npy"):
                        yield 1


def strict_floor(manifest_url: str, view: memoryview) -> Iterator[int]:
    """Every sample with the least work: one ``readinto`` per array member into a reused buffer, then a view."""
    folder = Path(manifest_url).parent
    for shard in load_manifest(manifest_url).shards:
        with open(folder / shard.name, "rb") as f:
            for m in walk_members(f):
                if m.ext.endswith("npy"):
                    f.seek(m.offset_data)
                    f.readinto(view[:m.size])
                    npy_view(view[:m.size])
                    if m.ext == "s2.npy":
                        yield 1


def loader_samples(loader: ShardLoader) -> Iterator[int]:
    for batch in loader:
        yield len(batch["keys"])


# -- S3 on loopback -----------------------------------------------------------------------------


class MotoS3:
    """A moto S3 server subprocess on loopback; the AWS variables point every client (and worker) at it."""

    def __enter__(self) -> "MotoS3":
        self._server = moto_server(set_env=True)
        self.url = self._server.__enter__()
        return self

    def upload(self, folder: Path) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put([str(p) for p in sorted(folder.glob("*.tar"))] + [str(folder / "manifest.json")], "bench/shards/")
        return "s3://bench/shards/manifest.json"

    def __exit__(self, *exc: Any) -> None:
        self._server.__exit__(*exc)


# -- the training step --------------------------------------------------------------------------


def train_step_rate(manifest_url: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    manifest = load_manifest(manifest_url)
    loader = ShardLoader(manifest, LoaderSettings(num_workers=0), micro_batch_size=args.mb, seed=0)
    batch = next(iter(loader))
    augment = DeviceAugment.for_manifest(manifest, args.image_size).to(device)
    cfg = FusMAEConfig.preset(args.model, img_size=args.image_size, s2_channels=loader.manifest.shape("s2")[0])
    torch.manual_seed(0)
    net = FusMAE(cfg).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def steps() -> Iterator[int]:
        s1, s2, _ = augment(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = net(s1, s2).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield args.mb

    return timed(forever(steps), args.seconds, warmup=2)


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["synthetic", "factory"], default="synthetic")
    parser.add_argument("--samples", type=int, default=64, help="samples in the shard set (synthetic: 4 per location)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="loader workers per rank, one local row each (0: in the calling process)")
    parser.add_argument("--mb", type=int, default=8, help="micro batch size")
    parser.add_argument("--shuffle-buffer", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per row and repetition")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the floors and local loader rows")
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit_s", "vit_b"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) row")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.source == "synthetic":
            manifest_url, archive = build_synthetic(work, max(1, args.samples // 4))
        else:
            manifest_url, archive = build_factory(work, args.samples)
        manifest = load_manifest(manifest_url)
        sample_mb = sum(s.bytes for s in manifest.shards) / manifest.num_samples / MB
        build_s = time.perf_counter() - t0

        if archive is not None:
            rows["source: Zarr archive (xarray), 1 process"] = {**timed(forever(lambda: zarr_samples(archive)),
                                                                        args.seconds), "workers": 1}
        # The floors and the local loader rows, measured in turn ``--repeat`` times (this VM's memory speed drifts
        # between minutes): each row's figure is its median, so the ratios compare neighbours in time.
        local: dict[str, list[dict[str, Any]]] = {}
        buffer = memoryview(bytearray(2 * max(s.bytes for s in manifest.shards)))  # touched once, reused
        kw = dict(micro_batch_size=args.mb, seed=0)
        for _ in range(args.repeat):
            local.setdefault("floor, plain: tarfile + np.load, 1 process", []).append(
                {**timed(forever(lambda: plain_floor(manifest_url)), args.seconds), "workers": 1, "floor": "plain"})
            local.setdefault("floor, strict: readinto a reused buffer + np.frombuffer, 1 process", []).append(
                {**timed(forever(lambda: strict_floor(manifest_url, buffer)), args.seconds), "workers": 1,
                 "floor": "strict"})
            for workers in args.workers:
                settings = LoaderSettings(num_workers=workers, shuffle_buffer=args.shuffle_buffer)
                loader = ShardLoader(manifest, settings, **kw)
                where = "in-process" if workers == 0 else f"{workers} worker{'s' * (workers > 1)}"
                local.setdefault(f"ShardLoader, local shards, {where}", []).append(
                    {**timed(loader_samples(loader), args.seconds, warmup=2 * max(1, workers)), "workers": workers,
                     "local": True})
                del loader
        for name, runs in local.items():
            rates = sorted(r["samples_per_s"] for r in runs)
            rows[name] = {**runs[0], "samples_per_s": float(np.median(rates)), "runs": rates}
        if not args.no_s3:
            workers = max(args.workers)
            settings = LoaderSettings(num_workers=workers, shuffle_buffer=args.shuffle_buffer)
            with MotoS3() as s3:
                s3_url = s3.upload(Path(manifest_url).parent)
                loader = ShardLoader(load_manifest(s3_url), settings, **kw)
                rows[f"ShardLoader, S3 (moto on loopback), {workers} workers"] = {
                    **timed(loader_samples(loader), args.seconds, warmup=2 * max(1, workers)), "workers": workers}
                del loader
        train = train_step_rate(manifest_url, args)

    floors = {row["floor"]: row["samples_per_s"] for row in rows.values() if "floor" in row}
    for row in rows.values():
        row["per_worker"] = row["samples_per_s"] / max(1, row["workers"])
        row["MB_per_s"] = row["samples_per_s"] * sample_mb
        row["x_train_step"] = row["samples_per_s"] / train["samples_per_s"]
        row["over_plain_floor"] = row["per_worker"] / floors["plain"]
        row["over_strict_floor"] = row["per_worker"] / floors["strict"]
    setup = {"source": args.source, "samples": manifest.num_samples, "shards": len(manifest.shards),
             "sample_MB": round(sample_mb, 2), "image": list(manifest.image_size), "repeat": args.repeat,
             "dtypes": [str(manifest.dtype("s1")), str(manifest.dtype("s2"))], "micro_batch": args.mb,
             "shuffle_buffer": args.shuffle_buffer, "seconds_per_row": args.seconds, "build_s": round(build_s, 1)}
    hw = hardware(torch.device(args.device))

    print_header("Training loader throughput", setup, hw)
    print("| path | samples/s | per worker | MB/s | per worker / plain floor | per worker / strict floor "
          "| x training step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['samples_per_s']:.1f} | {r['per_worker']:.1f} | {r['MB_per_s']:.0f} | "
              f"{r['over_plain_floor']:.2f} | {r['over_strict_floor']:.2f} | {r['x_train_step']:.1f} |")
    print(f"| training step: FusMAE {args.model}, {args.image_size} px, batch {args.mb}, {args.device} "
          f"(DeviceAugment + fwd + bwd + AdamW) | {train['samples_per_s']:.1f} | | | | | 1.0 |")
    print(f"\nPer worker: samples/s over the row's worker processes (in-process: the one process). The loader rows "
          f"include the main process taking the batches, which on this machine's {hw.get('usable_cores', '?')} "
          "cores shares them with the workers (and moto). 'x training step': samples/s supplied per sample/s the "
          "training step consumes here (> 1: the loader keeps up).")
    write_json(args.json, {"setup": setup, "hardware": hw, "rows": rows, "train_step": train}, indent=1)


if __name__ == "__main__":
    main()

"""Bytes a linear probe reads from the training split at a small label fraction, measured at the store.

The training split's shards sit on the local S3 endpoint (moto) behind a byte-counting
proxy on loopback (`launch/demo/proxy.py`, `StoreProxy`); validation and test are local folders. The
real command, ``python -m launch.eval`` with ``configs/eval/debug_linear.yaml`` and a
randomly initialised encoder (``eval.pretrained=none``; the weights do not change what is
read), runs at ``eval.label_fraction`` 1.0 and at the small fraction, each from a cold
start (no feature or label caches). Reported: bytes received from the store (HTTP included), as a
fraction of the training split's shard bytes. The small fraction runs twice: with the shard set's
sample index (`index.parquet`: keys, labels and byte offsets in one small file) and on a copy
without it, where a metadata pass over the tar headers and json members finds them.

    python bench/bench_label_subset.py [--patches 600] [--fraction 0.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import MB, ROOT, S3_ENV, hardware, markdown_table, moto_server, print_header, s3_bucket, write_json  # noqa: E402
from launch.demo.proxy import StoreProxy  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402


def build(work: Path, patches: int, size: int) -> Path:
    """BigEarthNet v2 archive (synthetic, published layout) sharded by the real pipeline, every split."""
    from pipeline import synthetic

    synthetic.make_bigearthnet(work / "archive", n_patches=patches, size=size, seed=3)
    proc = subprocess.run([sys.executable, "-m", "pipeline.preprocess", "--no-progress", "--source", "bigearthnet",
                           "--input", str(work / "archive"), "--output", str(work / "shards"), "--split", "all",
                           "--workers", "1", "--shard-size-mb", "16"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline.preprocess exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return work / "shards"


def probe(shards: Path, train_url: str, fraction: float, run_dir: Path, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "launch.eval", "--config", str(ROOT / "configs/eval/debug_linear.yaml"),
           "eval.pretrained=none", f"data.train_manifest={train_url}",
           f"data.val_manifest={shards / 'validation' / 'manifest.json'}",
           f"data.test_manifest={shards / 'test' / 'manifest.json'}", f"eval.label_fraction={fraction}",
           "eval.cache_features=false", "eval.epochs=2", "data.image_size=64",
           "model.patch_size=16", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"launch.eval exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=600, help="BigEarthNet patches in the archive (all splits)")
    p.add_argument("--size", type=int, default=120, help="patch side in 10 m pixels (BigEarthNet: 120)")
    p.add_argument("--fraction", type=float, default=0.01, help="the small eval.label_fraction")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-subset-") as tmp:
        work = Path(tmp)
        shards = build(work, args.patches, args.size)
        train = load_manifest(str(shards / "train" / "manifest.json"))
        split_bytes = sum(s.bytes for s in train.shards)
        rows, results = [], {}
        with moto_server(work / "moto.log") as endpoint:
            env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "PYTHONUNBUFFERED": "1"}
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
            bucket = s3_bucket(endpoint, prefix="subset")
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.put(str(shards / "train"), f"{bucket}/train", recursive=True)
            fs.put(str(shards / "train"), f"{bucket}/train-no-index", recursive=True)
            body = json.loads(fs.cat_file(f"{bucket}/train-no-index/manifest.json"))
            body.pop("index", None)  # as a shard set written before the index existed
            fs.pipe_file(f"{bucket}/train-no-index/manifest.json", json.dumps(body).encode())
            fs.rm_file(f"{bucket}/train-no-index/index.parquet")
            up = urlparse(endpoint)
            runs = [("label_fraction=1.0", "train", 1.0), (f"label_fraction={args.fraction}", "train", args.fraction),
                    (f"label_fraction={args.fraction}, no sample index", "train-no-index", args.fraction)]
            with StoreProxy((up.hostname, up.port)) as proxy:
                env["AWS_ENDPOINT_URL"] = proxy.url
                for name, folder, fraction in runs:
                    proxy.reset()
                    probe(shards, f"{bucket}/{folder}/manifest.json", fraction, work / f"run-{len(results)}", env)
                    got = proxy.received
                    results[name] = {"bytes_received": got, "of_split": got / split_bytes}
                    rows.append([name, f"{got / MB:.2f}", f"{got / split_bytes:.4f}"])
        setup = {"patches": args.patches, "size": args.size, "train_samples": train.num_samples,
                 "train_shard_bytes_MB": round(split_bytes / MB, 2), "fraction": args.fraction}
        print_header("Linear probe: bytes read from the training split", setup, hardware())
        print(markdown_table(["run", "MB received from the store", "of the split's bytes"], rows))
        small = results[runs[1][0]]["of_split"]
        walked = results[runs[2][0]]["of_split"]
        print(f"\nAt eval.label_fraction={args.fraction} the probe read {small:.4f} of the training split's bytes "
              f"with the sample index ({walked:.4f} without it, walking every sample's tar headers); at 1.0, "
              f"{results[runs[0][0]]['of_split']:.4f}.\n")
        write_json(args.json, {"setup": setup, "results": results, "small_over_split": small,
                               "small_over_split_without_index": walked})


if __name__ == "__main__":
    main()

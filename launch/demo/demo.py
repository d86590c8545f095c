"""The whole pipeline on an embedded default: `make demo` (or `python -m launch.demo`).

Stages, each a real command a user would run on a cluster:

1. make a small SAR-optical archive in the SSL4EO-S12 v1.1 Zarr layout and a BigEarthNet v2 archive
   (or use yours: --ssl4eo, --bigearthnet);
2. start an S3 endpoint on loopback (moto) unless --store local or your environment names one;
3. shard both archives with the Ray job (`python -m pipeline.preprocess`) into s3://;
4. pretrain with `deepspeed --num_gpus 2 launch/train.py`, stop half-way, resume with resume=auto
   from the checkpoint in object storage, export the encoder;
5. linear-probe the pretrained encoder and a randomly initialised one on BigEarthNet;
6. write a report (Markdown and HTML) with the loss curves, reconstructions and probe results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launch.demo import local_s3
from launch.demo.launchers import ROOT, deepspeed_command
from launch.demo.report import write_report

class StageFailed(RuntimeError):
    pass


@dataclass
class Demo:
    out: Path
    store: str
    smallest: bool
    ssl4eo: Optional[str]
    bigearthnet: Optional[str]
    ranks: int
    env: dict = field(default_factory=lambda: dict(os.environ))
    timings: list = field(default_factory=list)
    base_url: str = ""
    moto: Optional[subprocess.Popen] = None

    # ---------------------------------------------------------------- helpers
    def stage(self, name: str, fn, *args):
        print(f"\n=== [{len(self.timings) + 1}] {name}", flush=True)
        t0 = time.time()
        try:
            result = fn(*args)
        except StageFailed:
            raise
        except Exception as err:  # noqa: BLE001 - every failure is reported with its stage
            raise StageFailed(f"stage '{name}' failed: {type(err).__name__}: {err}") from err
        self.timings.append((name, time.time() - t0))
        print(f"=== {name}: done in {time.time() - t0:.1f}s", flush=True)
        return result

    def run(self, name: str, cmd: list[str], log: str) -> None:
        """Run a command with its output shown live and kept in <out>/logs/<log>."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / log
        print("$ " + " ".join(cmd), flush=True)
        with open(path, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                if not _noise(line):
                    sys.stdout.write("    " + line)
                    sys.stdout.flush()
            code = proc.wait()
        if code != 0:
            tail = "".join(path.read_text().splitlines(keepends=True)[-15:])
            raise StageFailed(f"stage '{name}' failed (exit code {code}); full log: {path}\n{tail}")

    def url(self, *parts: str) -> str:
        return "/".join([self.base_url.rstrip("/"), *parts])

    # ----------------------------------------------------------------- stages
    def make_archives(self) -> tuple[str, str]:
        from pipeline import synthetic

        ssl4eo, ben = self.ssl4eo, self.bigearthnet
        if ssl4eo is None:
            ssl4eo = str(self.out / "archives" / "ssl4eo-s12")
            files, per_file, size = (2, 4, 96) if self.smallest else (4, 8, 264)
            if not Path(ssl4eo).exists():
                synthetic.make_ssl4eo_zarr(ssl4eo, splits={"train": files}, samples_per_file=per_file, size=size,
                                           seed=1, products=("S1GRD", "S2L2A"))
            print(f"SSL4EO-S12 v1.1 Zarr archive: {ssl4eo} ({files * per_file} locations x 4 seasons, {size} px)")
        if ben is None:
            ben = str(self.out / "archives" / "bigearthnet")
            n, size = (36, 48) if self.smallest else (240, 120)
            if not Path(ben).exists():
                synthetic.make_bigearthnet(ben, n_patches=n, size=size, seed=2)
            print(f"BigEarthNet v2 archive: {ben} ({n} patches, {size} px)")
        return ssl4eo, ben

    def start_store(self) -> None:
        if self.store == "local":
            self.base_url = str(self.out / "store")
            print(f"object store: local folder {self.base_url}")
            return
        if "AWS_ENDPOINT_URL" in os.environ or os.environ.get("FUSMAE_DEMO_BUCKET"):
            bucket = os.environ.get("FUSMAE_DEMO_BUCKET", "fusmae-demo")
            self.base_url = f"s3://{bucket}/demo"
            print(f"object store: {self.base_url} (from your environment)")
            return
        self.moto, endpoint = local_s3.start(self.out / "logs" / "moto.log")
        # Credentials for the loopback endpoint only; the standard variables reach every process.
        creds = {**local_s3.LOOPBACK_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        self.env.update(creds)
        os.environ.update(creds)
        local_s3.create_bucket(endpoint, "fusmae-demo")
        self.base_url = "s3://fusmae-demo/demo"
        print(f"object store: {self.base_url} on a local S3 endpoint {endpoint} (moto)")

    def preprocess(self, source: str, archive: str, dest: str, extra: list[str]) -> None:
        self.run(f"preprocess {source}", [sys.executable, "-m", "pipeline.preprocess", "--source", source,
                                          "--input", archive, "--output", dest, "--workers", "2", *extra],
                 f"preprocess-{source}.log")

    def train_args(self, run_dir: Path) -> list[str]:
        steps = 16 if self.smallest else 160
        args = [f"data.manifest={self.url('shards', 'ssl4eo', 'manifest.json')}", f"run.dir={run_dir}",
                f"checkpoint.dir={self.url('runs', 'pretrain')}", f"train.max_steps={steps}"]
        if self.smallest:
            args += ["data.image_size=32", "train.micro_batch_size=4", "checkpoint.every_steps=4",
                     "train.log_every=2", "train.warmup_steps=2"]
        return args

    def pretrain(self, run_dir: Path, resume: bool) -> None:
        steps = 16 if self.smallest else 160
        cmd = deepspeed_command(self.ranks, "launch/train.py", ["--config", "configs/demo.yaml",
                                                                 *self.train_args(run_dir)])
        cmd += ["resume=auto"] if resume else [f"train.stop_at_step={steps // 2}"]
        self.run("pretrain (resume)" if resume else "pretrain (first half)", cmd,
                 "pretrain-resume.log" if resume else "pretrain.log")

    def probe(self, pretrained: str, name: str) -> dict:
        run_dir = self.out / "eval" / name
        shards = self.url("shards", "bigearthnet")
        args = [f"eval.pretrained={pretrained}", f"data.train_manifest={shards}/train/manifest.json",
                f"data.val_manifest={shards}/validation/manifest.json",
                f"data.test_manifest={shards}/test/manifest.json", f"run.dir={run_dir}"]
        if pretrained == "none":
            args += ["model.patch_size=8"]  # the bands come from the shards' manifest
        if self.smallest:
            args += ["data.image_size=48", "eval.epochs=5"]
        self.run(f"linear probe ({name})", [sys.executable, "-m", "launch.eval", "--config",
                                            "configs/eval/debug_linear.yaml", *args], f"eval-{name}.log")
        return json.loads((run_dir / "results.json").read_text())

    # ----------------------------------------------------------------- report
    def report(self, run_dir: Path, pretrained: dict, baseline: dict) -> Path:
        return write_report(self.out, run_dir, self.base_url, self.ranks, self.timings, pretrained, baseline,
                            mirror=self.moto is not None)


def _noise(line: str) -> bool:
    """Lines of library chatter that would drown the demo's own progress (they stay in the log files)."""
    return any(s in line for s in ("[WARNING]", "FutureWarning", "return func(*args", "UserWarning", "warnings.warn",
                                   "[INFO] [launch.py", "[INFO] [runner.py", "real_accelerator.py"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="folder for archives, logs, runs and the report")
    p.add_argument("--store", choices=("s3", "local"), default="s3",
                   help="s3: a local S3 endpoint (moto) unless AWS_ENDPOINT_URL / FUSMAE_DEMO_BUCKET name yours; "
                        "local: a folder")
    p.add_argument("--ssl4eo", help="an SSL4EO-S12 v1.1 Zarr archive (URL) instead of the generated one")
    p.add_argument("--bigearthnet", help="a BigEarthNet v2 archive (URL) instead of the generated one")
    p.add_argument("--ranks", type=int, default=2, help="training processes (GPUs, or CPU ranks without GPUs)")
    p.add_argument("--smallest", action="store_true", help="the smallest sizes (the test suite's end-to-end run)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    demo = Demo(out, args.store, args.smallest, args.ssl4eo, args.bigearthnet, args.ranks)
    demo.env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    demo.env["PYTHONUNBUFFERED"] = "1"
    t0 = time.time()
    try:
        ssl4eo, ben = demo.stage("make archives", demo.make_archives)
        demo.stage("object store", demo.start_store)
        demo.stage("preprocess SSL4EO-S12 (Ray)", demo.preprocess, "ssl4eo-zarr", ssl4eo,
                   demo.url("shards", "ssl4eo"), ["--s2-product", "L2A", "--shard-size-mb", "64"])
        demo.stage("preprocess BigEarthNet (Ray)", demo.preprocess, "bigearthnet", ben,
                   demo.url("shards", "bigearthnet"), ["--split", "all"])
        run_dir = out / "runs" / "pretrain"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        demo.stage("pretrain, first half (DeepSpeed)", demo.pretrain, run_dir, False)
        demo.stage("pretrain, resume=auto from the checkpoint (DeepSpeed)", demo.pretrain, run_dir, True)
        pre = demo.stage("linear probe, pretrained encoder", demo.probe, demo.url("runs", "pretrain"), "pretrained")
        base = demo.stage("linear probe, random initialisation", demo.probe, "none", "random-init")
        report = demo.stage("report", demo.report, run_dir, pre, base)
    except StageFailed as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1
    finally:
        if demo.moto is not None:
            local_s3.stop(demo.moto)
    print(f"\nDemo finished in {time.time() - t0:.0f}s.\n"
          f"  report:   {report} (and report.html)\n"
          f"  pictures: {out / 'loss_curves.png'}, {out / 'reconstructions.png'}\n"
          f"  probe mAP (macro): pretrained {pre['map_macro']:.4f} vs random init {base['map_macro']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a checkpoint costs a training run: the stall, the wall-clock overhead and the upload behind it.

Runs real ``deepspeed --num_gpus 2 launch/train.py`` trainings (CPU ranks when there is
no GPU) on a small shard set made by the pipeline, with a checkpoint every ``--every``
steps, once per target:

- ``local``: ``checkpoint.dir`` a local folder;
- ``s3``: ``checkpoint.dir`` on a moto S3 server on loopback (AWS_ENDPOINT_URL).

From the run's ``metrics.jsonl`` (logged every step) it takes the step time
(``samples_per_s``) and the stall the trainer reports (``checkpoint_stall_s``,
cumulative: the delta across a checkpoint step is that checkpoint's stall). A poller
thread in this process timestamps every metrics line as it appears, the staging folders
and the ``latest`` pointer, which gives the upload that ran behind training: from the
end of the stall to the commit of ``latest``, and the steps trained meanwhile.

    python bench/bench_checkpoint.py                         # vit_s at 64 px, ~2 min on 2 cores
    python bench/bench_checkpoint.py --size tiny --steps 12 --every 4   # smoke run
    python bench/bench_checkpoint.py --targets s3 --json bench/results/checkpoint.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

# Runnable as a plain script from any directory: the repository root holds `launch/`, `pipeline/`.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import (  # noqa: E402
    MB,
    ROOT,
    deepspeed_command,
    hardware,
    load_average,
    make_shards,
    markdown_table,
    moto_server,
    print_header,
    run_to_log,
    s3_bucket,
    training_env,
    write_json,
)

CONFIG = ROOT / "configs" / "debug.yaml"
WARMUP_STEPS = 3  # the first steps carry one-off costs (allocations, loader start): not in the step time
RANKS = 2


# -- watching a run from outside ------------------------------------------------------------------


class Timeline(threading.Thread):
    """Polls a run every ``interval`` s and timestamps what appears: metrics lines (by step),
    staging folders (by rank and tag: first and last seen) and the tags ``latest`` names."""

    def __init__(self, run_dir: Path, ckpt_url: str, interval: float = 0.05):
        super().__init__(name="timeline", daemon=True)
        from pipeline.storage import url_to_fs

        self.run_dir, self.interval = run_dir, interval
        options = {"skip_instance_cache": True} if ckpt_url.startswith("s3://") else {}
        self.fs, self.root = url_to_fs(ckpt_url, options)
        self.rows: dict[int, float] = {}
        self.staging: dict[tuple[int, str], list[float]] = {}
        self.commits: dict[str, float] = {}
        self._offset = 0
        self._partial = b""
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.poll()
            self._done.wait(self.interval)
        self.poll()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def poll(self) -> None:
        now = time.time()
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            with open(metrics, "rb") as f:
                f.seek(self._offset)
                data = self._partial + f.read()
                self._offset = f.tell()
            *lines, self._partial = data.split(b"\n")
            for line in lines:
                if line.strip():
                    self.rows.setdefault(json.loads(line)["step"], now)
        for rank in range(RANKS):
            folder = self.run_dir / "staging" / f"rank{rank}"
            with contextlib.suppress(FileNotFoundError):
                for tag in os.listdir(folder):
                    seen = self.staging.setdefault((rank, tag), [now, now])
                    seen[1] = now
        try:
            tag = json.loads(self.fs.cat_file(f"{self.root}/latest"))["tag"]
            self.commits.setdefault(tag, now)
        except Exception:  # noqa: BLE001 - not committed yet, or a transient storage error: poll again
            pass


# -- one training run -----------------------------------------------------------------------------


def train(target: str, manifest: Path, work: Path, args: argparse.Namespace,
          endpoint: Optional[str]) -> dict[str, Any]:
    run_dir = work / f"run-{target}"
    ckpt_url = f"{s3_bucket(endpoint)}/ckpt" if endpoint else str(run_dir / "ckpt")
    overrides = [
        f"data.manifest={manifest}", f"run.dir={run_dir}", f"checkpoint.dir={ckpt_url}",
        f"model.size={args.size}", f"model.patch_size={args.patch_size}", f"data.image_size={args.image_size}",
        f"train.micro_batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        f"checkpoint.every_steps={args.every}", "checkpoint.keep=2", "train.log_every=1",
        f"train.bf16={str(args.bf16).lower()}", f"deepspeed.zero_stage={args.zero_stage}",
        f"data.num_workers={args.workers}", "train.warmup_steps=2",
    ]
    cmd = deepspeed_command(RANKS, ROOT / "launch" / "train.py", CONFIG, overrides)
    timeline = Timeline(run_dir, ckpt_url, args.poll)
    start = time.perf_counter()
    log_path = work / f"train-{target}.log"
    try:
        code = run_to_log(cmd, log_path, args.timeout, env=training_env(), started=timeline.start)
    finally:
        if timeline.is_alive():
            timeline.stop()
    wall = time.perf_counter() - start
    if code != 0:
        how = code if isinstance(code, str) else f"exited {code}"
        raise RuntimeError(f"training ({target}) {how}:\n{log_path.read_text()[-5000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    sizes = checkpoint_sizes(timeline, ckpt_url)
    return analyse(target, rows, timeline, sizes, args, wall)


def checkpoint_sizes(timeline: Timeline, ckpt_url: str) -> dict[str, int]:
    """Bytes per file of the newest committed checkpoint, from the ranks' upload records."""
    tag = json.loads(timeline.fs.cat_file(f"{timeline.root}/latest"))["tag"]
    files: dict[str, int] = {}
    for path in timeline.fs.ls(f"{timeline.root}/{tag}/_ranks", detail=False):
        for f in json.loads(timeline.fs.cat_file(path))["files"]:
            files[f["name"]] = f["bytes"]
    return files


def analyse(target: str, rows: list[dict[str, Any]], tl: Timeline, sizes: dict[str, int],
            args: argparse.Namespace, wall: float) -> dict[str, Any]:
    samples_per_step = args.batch_size * RANKS
    by_step = {r["step"]: r for r in rows}
    step_s = {s: samples_per_step / r["samples_per_s"] for s, r in by_step.items()}  # log to log: one step
    # The trainer checkpoints at step s before it logs step s: the row of step s carries that
    # checkpoint's stall and its interval contains it; the row is written as the stall ends.
    # The one at the last step is left out: training has ended, so nothing overlaps its upload.
    ckpt_steps = [s for s in by_step if s % args.every == 0 and s - 1 in by_step and s != max(by_step)]
    checkpoints = []
    for s in ckpt_steps:
        tag = f"step-{s:08d}"
        stall = by_step[s]["checkpoint_stall_s"] - by_step[s - 1]["checkpoint_stall_s"]
        save_end = tl.rows[s]  # the metrics line of step s is written as the stall ends
        commit = tl.commits.get(tag)
        # a commit before the stall ended (a fast local copy finishing while the pictures are drawn) is 0
        upload = max(0.0, commit - save_end) if commit is not None else None
        during = [t for t, when in tl.rows.items() if commit is not None and save_end < when <= commit]
        # last seen in staging (removed once uploaded); < 0 is within the poll interval: 0
        rank_done = [max(0.0, seen[1] - save_end) for (_, t), seen in tl.staging.items() if t == tag]
        checkpoints.append({"step": s, "stall_s": stall, "interval_s": step_s[s], "upload_s": upload,
                            "steps_during_upload": len(during), "during_upload": during,
                            "rank_uploads_s": sorted(rank_done)})
    in_upload = {t for c in checkpoints for t in c["during_upload"]}
    after_ckpt = {c["step"] for c in checkpoints}
    clean = [step_s[s] for s in step_s if s > WARMUP_STEPS and s not in after_ckpt | in_upload]
    uploading = [step_s[s] for s in in_upload if s > WARMUP_STEPS and s not in after_ckpt]
    if not clean:
        raise RuntimeError(f"{target}: no step without checkpoint activity to time; raise --every")
    base = statistics.fmean(clean)
    for c in checkpoints:
        c["overhead_s"] = c["interval_s"] - base  # everything the checkpoint step took beyond a step
        c["not_in_stall_s"] = c["overhead_s"] - c["stall_s"]
    size = sum(sizes.values())
    # The first checkpoint pays one-off costs (imports of matplotlib and the storage client, first
    # connections): the means are over the later ones, the steady state of a long run.
    steady = checkpoints[1:] if len(checkpoints) > 1 else checkpoints
    uploads = [c["upload_s"] for c in steady if c["upload_s"] is not None]
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    out = {
        "target": target,
        "wall_s": wall,
        "step_s_mean": base,
        "step_s_median": statistics.median(clean),
        "steps_timed": len(clean),
        "step_s_during_upload": mean(uploading),
        "checkpoints_timed": len(checkpoints),
        "checkpoints_in_means": [c["step"] for c in steady],
        "checkpoint_mb": size / MB,
        "files_mb": {k: v / MB for k, v in sorted(sizes.items())},
        "stall_s_mean": mean([c["stall_s"] for c in steady]),
        "overhead_s_mean": mean([c["overhead_s"] for c in steady]),
        "not_in_stall_s_mean": mean([c["not_in_stall_s"] for c in steady]),
        "upload_s_mean": mean(uploads),
        "steps_during_upload_mean": mean([c["steps_during_upload"] for c in steady]),
        "checkpoints": checkpoints,
    }
    out["stall_over_step"] = out["stall_s_mean"] / base
    out["overhead_over_step"] = out["overhead_s_mean"] / base
    # below the poll interval the upload hid entirely inside the stall: no rate to report
    out["upload_mb_per_s"] = size / MB / out["upload_s_mean"] if uploads and out["upload_s_mean"] > args.poll else float("nan")
    out["slowdown_during_upload"] = out["step_s_during_upload"] / base
    # The share of training time checkpoints take at this frequency (every --every steps).
    out["overhead_share"] = out["overhead_s_mean"] / (args.every * base + out["overhead_s_mean"])
    return out


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_s", choices=["tiny", "vit_s", "vit_b"], help="model.size")
    parser.add_argument("--image-size", type=int, default=64, help="data.image_size (px)")
    parser.add_argument("--patch-size", type=int, default=16, help="model.patch_size")
    parser.add_argument("--batch-size", type=int, default=4, help="train.micro_batch_size per rank")
    parser.add_argument("--steps", type=int, default=36, help="train.max_steps")
    parser.add_argument("--every", type=int, default=8, help="checkpoint.every_steps")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="train.bf16=false (default bf16)")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers per rank")
    parser.add_argument("--targets", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--poll", type=float, default=0.05, help="poller interval, s")
    parser.add_argument("--timeout", type=float, default=900, help="per training run, s")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where shards, runs and checkpoints go")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - {"local", "s3"} or not targets:
        parser.error("--targets: local and/or s3")
    if args.steps < 2 * args.every + 1 or args.every <= WARMUP_STEPS:
        parser.error(f"need --every > {WARMUP_STEPS} and --steps > 2 x --every (two timed checkpoints)")

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="fusmae-bench-checkpoint-", dir=args.tmpdir))
    results = []
    try:
        # 4 samples per location; enough that the loader does not just cycle a handful
        manifest = make_shards(work, locations=8, size=max(96, args.image_size))
        for target in targets:
            if target == "local":
                results.append(train(target, manifest, work, args, None))
            else:
                with moto_server(work / "moto.log", set_env=True) as endpoint:
                    results.append(train(target, manifest, work, args, endpoint))
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    from launch.config import load_config
    from model import FusMAE

    cfg = load_config(str(CONFIG), ["data.manifest=unused", f"model.size={args.size}",
                                    f"model.patch_size={args.patch_size}", f"data.image_size={args.image_size}"])
    params = sum(p.numel() for p in FusMAE(cfg.model).parameters())
    hw = hardware(packages=("torch", "deepspeed"))
    hw["load_avg_1m"] = f"{load_before} at start, {load_average()} at end"
    setup = {
        "model": args.size, "params_M": round(params / 1e6, 1), "image_size": args.image_size,
        "patch_size": args.patch_size, "ranks": RANKS, "micro_batch": args.batch_size,
        "precision": "bf16" if args.bf16 else "fp32", "zero_stage": args.zero_stage, "steps": args.steps,
        "checkpoint_every": args.every, "keep": 2, "loader_workers": args.workers,
        "launcher": "deepspeed --num_gpus 2 launch/train.py", "poll_s": args.poll,
    }

    print_header("Checkpoint cost during training: local folder vs S3", setup, hw)
    num = lambda x, spec: "–" if x != x else format(x, spec)  # noqa: E731 - NaN: nothing to show
    print(markdown_table(
        ["target", "step s (no ckpt)", "ckpt MB", "stall s", "stall / step", "wall overhead s",
         "overhead / step", "upload s (save → latest)", "steps during upload", "upload MB/s",
         "step s during upload", f"share of time (every {args.every})"],
        [[r["target"], f"{r['step_s_mean']:.3f}", f"{r['checkpoint_mb']:.0f}", f"{r['stall_s_mean']:.2f}",
          f"{r['stall_over_step']:.1f}", f"{r['overhead_s_mean']:.2f}", f"{r['overhead_over_step']:.1f}",
          num(r["upload_s_mean"], ".2f"), num(r["steps_during_upload_mean"], ".1f"),
          num(r["upload_mb_per_s"], ".0f"), num(r["step_s_during_upload"], ".3f"), f"{100 * r['overhead_share']:.0f}%"] for r in results]))
    print()
    print("Per checkpoint:\n")
    print(markdown_table(
        ["target", "step", "stall s", "wall overhead s", "not in stall s", "upload s", "steps during upload",
         "rank uploads done s (after stall)"],
        [[r["target"], c["step"], f"{c['stall_s']:.2f}", f"{c['overhead_s']:.2f}", f"{c['not_in_stall_s']:.2f}",
          "–" if c["upload_s"] is None else f"{c['upload_s']:.2f}", c["steps_during_upload"],
          ", ".join(f"{t:.2f}" for t in c["rank_uploads_s"])] for r in results for c in r["checkpoints"]]))
    first = results[0]
    print(f"\nFiles of one checkpoint ({first['target']}): "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in first["files_mb"].items()))
    print(f"\nStep s: mean over the steps with no checkpoint and no upload in flight ({first['steps_timed']} in "
          f"the {first['target']} run), after {WARMUP_STEPS} warm-up steps. Checkpoint columns: means over the "
          f"checkpoints at steps {first['checkpoints_in_means']} (the first pays one-off imports and "
          "connections; all are in the per-checkpoint table). Stall: the trainer's checkpoint_stall_s (local write + "
          "wait for the previous upload). Wall overhead: the checkpoint step's interval minus a step; "
          "'not in stall' is what the checkpoint step took beyond the reported stall (the reconstruction "
          "pictures, and the upload thread competing for the cores). Upload: end of the stall to the commit "
          f"of `latest`, polled every {args.poll} s; the checkpoint at the last step is left out (training "
          "has ended: nothing overlaps its upload). Share of time: overhead / (every x step + overhead).")
    if len(results) == 2:
        a, b = results
        ratio = lambda key: b[key] / a[key] if a[key] > 0 else float("nan")  # noqa: E731
        print(f"\n{b['target']} / {a['target']}: stall {ratio('stall_s_mean'):.2f}x, "
              f"wall overhead {ratio('overhead_s_mean'):.2f}x, upload {ratio('upload_s_mean'):.2f}x "
              "(same settings, runs one after the other)")
    write_json(args.json, {"setup": setup, "hardware": hw, "results": results})


if __name__ == "__main__":
    main()

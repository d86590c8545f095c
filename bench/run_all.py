"""Run every benchmark and write one Markdown report: the machine, a summary of the headline ratios,
and each benchmark's own section (its Setup and Hardware lines and tables).

Each script runs as a subprocess with ``--json``, one after the other (they would
disturb each other's timings otherwise). A failing benchmark is reported in the file
and does not stop the others; the exit status is 1 if any failed. A benchmark that
does not apply to the machine (bench_train_gpu without a GPU) is reported as skipped.

Writes ``bench/results/<YYYY-MM-DD>-<machine>.md`` (``-quick`` added with --quick), a
copy as ``bench/results/latest.md``, and the scripts' JSON beside it (``.json``, not
tracked by git).

    python bench/run_all.py                       # everything at the scripts' defaults (~10 min on 2 cores)
    python bench/run_all.py --quick               # smaller sizes: a smoke run (~4 min)
    python bench/run_all.py --only checkpoint,zero_memory
    make bench ARGS="--quick"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import ROOT, hardware, key_values, load_average, markdown_table  # noqa: E402

BENCH = ROOT / "bench"
Headline = tuple[str, str]  # (what, value)


# -- what each benchmark's headline is ------------------------------------------------------------


def _attention(r: dict[str, Any]) -> list[Headline]:
    s = r["setup"]
    return [(f"SDPA / eager training throughput ({s['size']}, {s['device']}, {s['dtype']})",
             f"{r['sdpa_over_eager']:.2f}x")]


def _loader(r: dict[str, Any]) -> list[Headline]:
    out = [(f"{name}: per worker / plain tarfile + np.load floor (strict floor)",
            f"{row['over_plain_floor']:.2f} ({row['over_strict_floor']:.2f})")
           for name, row in r["rows"].items() if row.get("local")]
    return out + [(f"{name} / training step (samples/s)", f"{row['x_train_step']:.1f}x")
                  for name, row in r["rows"].items() if name.startswith("ShardLoader")]


def _preprocess(r: dict[str, Any]) -> list[Headline]:
    out = []
    for job in r["jobs"]:
        if job["workers"] != r["jobs"][0]["workers"] and job["target"] == "local":
            out.append((f"preprocess scaling, {job['workers']} workers / {r['jobs'][0]['workers']}",
                        f"{job['scaling_vs_first']:.2f}x"))
    first = r["jobs"][0]
    out.append((f"preprocess per worker / read-only floor ({first['workers']} worker)",
                f"{first['over_floor_per_worker']:.2f}"))
    return out


def _planning(r: dict[str, Any]) -> list[Headline]:
    files = r["setup"]["files"]
    return [(f"planning, {j['workers']} worker(s), s per 1,000 input files on S3",
             f"{j['plan_seconds'] / files * 1000:.1f}") for j in r["jobs"]]


def _checkpoint(r: dict[str, Any]) -> list[Headline]:
    out = []
    for t in r["results"]:
        out.append((f"checkpoint stall / step time ({t['target']}, {t['checkpoint_mb']:.0f} MB)",
                    f"{t['stall_over_step']:.1f}x"))
        out.append((f"checkpoint wall overhead / step time ({t['target']})", f"{t['overhead_over_step']:.1f}x"))
        out.append((f"upload behind training, save → latest ({t['target']})",
                    f"{t['upload_s_mean']:.2f} s, {t['steps_during_upload_mean']:.1f} steps"))
    return out


def _zero_memory(r: dict[str, Any]) -> list[Headline]:
    ref = next((s for s in r["stages"] if s["stage"] == 0), r["stages"][0])
    return [(f"ZeRO-{s['stage']} / ZeRO-{ref['stage']} model states per rank ({r['setup']['model']}, "
             f"{r['setup']['ranks']} ranks)", f"{s['over_reference']:.2f} (paper {s['paper_over_reference']:.2f})")
            for s in r["stages"] if s is not ref]


def _train_gpu(r: dict[str, Any]) -> list[Headline]:
    res = r["results"]
    mfu = res["sdpa"]["mfu"]
    return [("SDPA / eager training throughput (ViT-B recipe, GPU)", f"{r['sdpa_over_eager']:.2f}x"),
            ("MFU, SDPA (ViT-B recipe)", "–" if mfu is None else f"{100 * mfu:.1f}%")]


def _label_subset(r: dict[str, Any]) -> list[Headline]:
    return [(f"linear probe at label_fraction={r['setup']['fraction']}: bytes read / training split",
             f"{r['small_over_split']:.4f}")]


def _pretraining(r: dict[str, Any]) -> list[Headline]:
    return [(f"pretrained - random init, linear probe mAP ({g['fusion']}, {g['pool']} pool)",
             f"{g['gap_mean']:+.3f} ± {g['gap_std']:.3f}") for g in r["gaps"]]


def _remote_input(r: dict[str, Any]) -> list[Headline]:
    out = []
    default = r["setup"]["default_depth"]
    for latency in sorted({row["latency_ms"] for row in r["rows"]}):
        by_depth = {row["depth"]: row for row in r["rows"] if row["latency_ms"] == latency}
        if 0 in by_depth and default in by_depth and default != 0:
            out.append((f"WebDataset release from S3, {latency:.0f} ms round trip: read-ahead {default} / none",
                        f"{by_depth[default]['samples_per_s'] / by_depth[0]['samples_per_s']:.2f}x"))
    return out


def _upload(r: dict[str, Any]) -> list[Headline]:
    runs = r["runs"]
    peak = {v: max(x["peak_over_before"] for x in runs if x["variant"] == v) for v in ("s3fs", "put_atomic")}
    best = {v: min(x["seconds"] for x in runs if x["variant"] == v) for v in ("s3fs", "put_atomic")}
    return [(f"uploading a {r['setup']['file_mib']} MiB shard to S3: peak memory, put_atomic / s3fs defaults",
             f"{peak['put_atomic'] / peak['s3fs']:.2f}x"),
            ("the same: time", f"{best['put_atomic'] / best['s3fs']:.2f}x")]


def _cache_download(r: dict[str, Any]) -> list[Headline]:
    rows = r["rows"]
    seq = min(x["seconds"] for x in rows if x["way"] == "sequential")
    out = []
    for streams in sorted({x["streams"] for x in rows if x["way"] == "ranged"}):
        best = min(x["seconds"] for x in rows if x["way"] == "ranged" and x["streams"] == streams)
        out.append((f"copying a shard into the node cache, {streams} ranged requests in flight / one connection",
                    f"{seq / best:.2f}x"))
    return out


@dataclass
class Bench:
    script: str
    headline: Callable[[dict[str, Any]], list[Headline]]
    quick: list[str] = field(default_factory=list)
    gpu: list[str] = field(default_factory=list)
    """Extra arguments when a GPU is present."""


BENCHES: dict[str, Bench] = {
    "attention": Bench("bench_attention.py", _attention, quick=["--steps", "5", "--warmup", "1"],
                       gpu=["--device", "cuda", "--dtype", "bf16", "--size", "vit_s"]),
    "loader": Bench("bench_loader.py", _loader,
                    quick=["--samples", "16", "--seconds", "2", "--workers", "0", "1", "--repeat", "1"],
                    gpu=["--device", "cuda", "--model", "vit_s"]),
    "preprocess": Bench("bench_preprocess.py", _preprocess, quick=["--samples", "64"]),
    "planning": Bench("bench_planning.py", _planning, quick=["--files", "40", "--workers", "1"]),
    "remote_input": Bench("bench_remote_input.py", _remote_input,
                          quick=["--samples", "32", "--latency-ms", "20", "--depths", "0", "4"]),
    "upload": Bench("bench_upload.py", _upload, quick=["--mb", "64", "--repeat", "1"]),
    "cache_download": Bench("bench_cache_download.py", _cache_download, quick=["--mb", "32", "--repeat", "1"]),
    "checkpoint": Bench("bench_checkpoint.py", _checkpoint, quick=["--size", "tiny", "--steps", "12", "--every", "4"]),
    "zero_memory": Bench("bench_zero_memory.py", _zero_memory, quick=["--size", "tiny", "--steps", "2"]),
    "label_subset": Bench("bench_label_subset.py", _label_subset, quick=["--patches", "200", "--fraction", "0.05"]),
    "pretraining": Bench("bench_pretraining.py", _pretraining,
                         quick=["--steps", "30", "--seeds", "2", "--epochs", "5", "--locations", "16"]),
    "train_gpu": Bench("bench_train_gpu.py", _train_gpu, quick=["--steps", "3", "--warmup", "1", "--batch-size", "8"]),
}


# -- running them ---------------------------------------------------------------------------------


def run_bench(name: str, bench: Bench, args: argparse.Namespace, work: Path, has_gpu: bool) -> dict[str, Any]:
    json_path = work / f"{name}.json"
    cmd = [sys.executable, str(BENCH / bench.script), *(bench.quick if args.quick else []),
           *(bench.gpu if has_gpu else []), "--json", str(json_path)]
    shown = " ".join(["python", f"bench/{bench.script}", *map(shlex.quote, cmd[2:-2])])
    print(f"[run_all] {name}: {shown}", flush=True)
    start = time.perf_counter()
    out_path, err_path = work / f"{name}.stdout", work / f"{name}.stderr"
    # Files, not pipes: a benchmark's grandchildren (loader workers, servers) may hold a pipe open.
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # Its own process group: on a timeout, its children (training ranks, servers) go with it.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        try:
            code: Any = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = f"timed out after {args.timeout:.0f} s"
    seconds = time.perf_counter() - start
    stdout, stderr = out_path.read_text(), err_path.read_text()
    # The report starts at the script's "## " heading (libraries may print before it).
    report = stdout[stdout.index("## "):] if "## " in stdout else stdout
    result: dict[str, Any] = {"name": name, "command": shown, "seconds": seconds, "exit": code,
                              "report": report.strip(), "headlines": []}
    if code != 0:
        result["status"] = "failed"
        result["error"] = (stderr.strip() or stdout.strip())[-4000:]
    elif not json_path.exists():
        result["status"] = "failed"
        result["error"] = "exited 0 but wrote no --json file"
    else:
        data = json.loads(json_path.read_text())
        result["json"] = data
        if "skipped" in data:
            result["status"] = "skipped"
            result["reason"] = data["skipped"]
        else:
            result["status"] = "ok"
            try:
                result["headlines"] = bench.headline(data)
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                result["headlines"] = [("headline", f"not found in the JSON: {type(e).__name__}: {e}")]
    print(f"[run_all] {name}: {result['status']} in {seconds:.0f} s", flush=True)
    return result


def machine_slug(hw: dict[str, Any]) -> str:
    """The host's name, unless it is a container's random id; then the GPU or CPU model."""
    host = socket.gethostname().split(".")[0]
    if host and not re.fullmatch(r"[0-9a-f]{8,}", host) and host != "localhost":
        name = host
    else:
        name = f"{hw.get('gpu') or hw['cpu']}-{hw['usable_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_report(results: list[dict[str, Any]], hw: dict[str, Any], args: argparse.Namespace,
                 started: datetime.datetime, total_s: float) -> str:
    lines = [f"# Fus-MAE benchmarks, {started:%Y-%m-%d %H:%M}" + (" (quick: smoke-run sizes)" if args.quick else ""),
             "",
             f"Machine: {key_values(hw)}",
             "",
             f"Command: `python bench/run_all.py {' '.join(map(shlex.quote, sys.argv[1:]))}`".rstrip(),
             f"({total_s / 60:.1f} min; benchmarks run one after the other; ratios are measured within one run "
             "of one script, absolute numbers hold for this machine only)",
             "",
             "## Summary",
             ""]
    rows = []
    for r in results:
        status = {"ok": "ok", "skipped": f"skipped: {r.get('reason', '')}", "failed": f"**FAILED** ({r['exit']})"}
        if r["headlines"]:
            rows += [[r["name"], what, value, status[r["status"]], f"{r['seconds']:.0f}"]
                     for what, value in r["headlines"]]
        else:
            rows.append([r["name"], "–", "–", status[r["status"]], f"{r['seconds']:.0f}"])
    lines += [markdown_table(["benchmark", "headline", "value", "status", "s"], rows, "llllr"), ""]
    for r in results:
        lines.append(f"<!-- {r['name']}: {r['command']} -->")
        if r["status"] == "failed":
            how = r["exit"] if isinstance(r["exit"], str) else f"exited {r['exit']} after {r['seconds']:.0f} s"
            lines += [f"## {r['name']}: FAILED", "", f"`{r['command']}` {how}; the end of its output:",
                      "", "```", r["error"] or "(no output)", "```"]
        else:
            lines += [r["report"], "", f"_`{r['command']}`: {r['seconds']:.0f} s_"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run of every benchmark")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(BENCHES)}")
    parser.add_argument("--timeout", type=float, default=1800, help="per benchmark, s")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder for the report")
    parser.add_argument("--name", default=None, help="machine name in the file name (default: host or CPU/GPU)")
    args = parser.parse_args()
    names = list(BENCHES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown or not names:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {','.join(BENCHES)}")

    import torch

    has_gpu = torch.cuda.is_available()
    hw = hardware(device="cuda" if has_gpu else None, packages=("torch",))
    hw["load_avg_1m_at_start"] = load_average()
    started = datetime.datetime.now()
    work = Path(tempfile.mkdtemp(prefix="fusmae-run-all-"))
    start = time.perf_counter()
    try:
        results = [run_bench(n, BENCHES[n], args, work, has_gpu) for n in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hw["load_avg_1m_at_end"] = load_average()
    text = write_report(results, hw, args, started, time.perf_counter() - start)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y-%m-%d}-{args.name or machine_slug(hw)}" + ("-quick" if args.quick else "")
    path = args.out / f"{stem}.md"
    path.write_text(text + "\n")
    shutil.copyfile(path, args.out / "latest.md")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"hardware": hw, "quick": args.quick, "results": [{k: v for k, v in r.items() if k != "report"}
                                                         for r in results]}, indent=1, default=str) + "\n")
    failed = [r["name"] for r in results if r["status"] == "failed"]
    print(f"[run_all] wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} (and latest.md)"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

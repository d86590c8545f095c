"""The GPU check: everything a lent GPU should tell us, in one call and one report.

    bash bench/gpu_check.sh --out $OUT/gpu_check            # on the GPU machine: set up, then ~6-8 min
    python bench/gpu_check.py --cpu-dry-run --out /tmp/gc    # the same steps at tiny sizes on CPU (tested)

Steps, each a subprocess with its own time limit (a step that fails or runs out of time is reported and
the others still run):

1. ``sdpa``: which scaled-dot-product-attention kernels run at the ViT-B attention shapes in bf16
   (flash, memory-efficient, cuDNN, math, each alone), and that the model's own call does not fall
   back to the math kernel (on a GPU that is a failure; on CPU only recorded).
2. ``train``: `bench_train_gpu.py`: ViT-B Fus-MAE training samples/s and MFU in bf16, SDPA vs eager,
   and SDPA under ``torch.compile``.
3. ``zero2``: the real training script, ``deepspeed --num_gpus 1 launch/train.py`` with ZeRO-2 and
   DeepSpeed's fused Adam (``deepspeed.torch_adam=false``) on the ViT-B recipe, from local shards:
   samples/s and MFU from its metrics.jsonl (the last logged rows, after warm-up).
4. ``loader``: `bench_loader.py`: the loader's samples/s from local shards beside the training step
   it has to feed on this device.

Writes ``<out>/gpu_check.md`` (the report) and ``<out>/gpu_check.json``, and each step's log and JSON.
The exit status is 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent),
                str(Path(__file__).resolve().parents[1] / "tests")]

from common import ROOT, hardware, training_env  # noqa: E402

SDPA_PROBE = r"""
import json, sys, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from model.attention import attend  # the model's own attention call
gpu = torch.cuda.is_available()
dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
B, H, L, D = (64, 12, 99, 64) if gpu else (2, 4, 17, 16)  # ViT-B: 12 heads of 64, 2 x 49 visible + CLS
q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
out = {"device": torch.cuda.get_device_name() if gpu else "cpu", "shape": [B, H, L, D], "dtype": str(dtype),
       "backends": {}}
for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
    backend = getattr(SDPBackend, name, None)
    if backend is None:
        continue
    try:
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        out["backends"][name.lower()] = "runs"
    except Exception as err:  # noqa: BLE001
        out["backends"][name.lower()] = "unavailable: " + str(err).splitlines()[0][:160]
fast = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    getattr(SDPBackend, "CUDNN_ATTENTION", None)) if b is not None]
try:
    with sdpa_kernel(fast):  # the model's call, with the math kernel not allowed
        attend(q, k, v, fused=True).sum().backward()
    out["not_math"] = True
except Exception as err:  # noqa: BLE001
    out["not_math"] = False
    out["not_math_error"] = str(err).splitlines()[0][:200]
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
sys.exit(0 if out["not_math"] or not gpu else 1)
"""


def run_step(name: str, cmd: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run one step with its output in ``<out>/<name>.log``; its status and wall time."""
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=training_env())
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "log": log.name}


def make_shards(work: Path, samples: int, hw: int) -> str:
    from shardfactory import make_shard_set  # tests/: the pipeline's exact shard format

    sizes = [16] * (samples // 16) + ([samples % 16] if samples % 16 else [])
    return make_shard_set(str(work / "shards"), sizes, hw=hw, s2_channels=13, s1_dtype="float16")


def zero2_command(manifest: str, run_dir: Path, dry: bool) -> list[str]:
    from launch.demo.launchers import deepspeed_command

    args = ["--config", str(ROOT / "configs" / "vit_b.yaml"), f"data.manifest={manifest}", f"run.dir={run_dir}",
            "deepspeed.zero_stage=2", "checkpoint.dir=null", "train.grad_accum_steps=1"]
    if dry:  # tiny, on the CPU: torch's AdamW (DeepSpeed's fused Adam needs a GPU)
        args += ["train.max_steps=4", "train.warmup_steps=1", "train.log_every=2", "data.num_workers=1",
                 "model.size=tiny", "model.patch_size=8", "data.image_size=32", "train.micro_batch_size=2",
                 "train.bf16=false", "data.shuffle_buffer=8"]
    else:  # the recipe's model, batch 64 and bf16; enough steps to pass warm-up and the loader's start
        args += ["train.max_steps=40", "train.warmup_steps=5", "train.log_every=10", "data.num_workers=6",
                 "deepspeed.torch_adam=false"]
    return deepspeed_command(1, ROOT / "launch" / "train.py", args)


def zero2_result(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = rows[-1] if rows else {}
    return {"rows": len(rows), "last": {k: last.get(k) for k in ("step", "samples_per_s", "mfu", "loss", "lr")}}


def _num(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def report(steps: dict[str, dict[str, Any]], results: dict[str, Any], hw: dict[str, Any], dry: bool) -> str:
    lines = [f"# GPU check{' (CPU dry run: tiny sizes, no GPU numbers)' if dry else ''}\n",
             "Hardware: " + ", ".join(f"{k}={v}" for k, v in hw.items()) + "\n",
             "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in steps.items()]
    sdpa = results.get("sdpa") or {}
    if sdpa:
        lines += ["", f"## SDPA kernels at {sdpa.get('shape')} {sdpa.get('dtype')} on {sdpa.get('device')}", ""]
        lines += [f"- {name}: {state}" for name, state in sdpa.get("backends", {}).items()]
        lines.append(f"- the model's call without the math kernel: {'runs' if sdpa.get('not_math') else 'FAILS'}")
    train = results.get("train") or {}
    if train.get("results"):
        lines += ["", "## Training step (bench_train_gpu.py)", "", "| variant | samples/s | MFU | peak GB |",
                  "|---|---:|---:|---:|"]
        for name, r in train["results"].items():
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {name} | {r['samples_per_s']:.1f} | {mfu} | {r['peak_memory_gb']:.1f} |")
        if train.get("compile_error"):
            lines.append(f"\ntorch.compile: {train['compile_error']}")
    zero2 = results.get("zero2")
    if zero2:
        last = zero2["last"]
        mfu = "-" if last.get("mfu") is None else f"{100 * last['mfu']:.1f}%"
        lines += ["", "## launch/train.py, ZeRO-2, one GPU" + ("" if dry else ", DeepSpeed fused Adam"), "",
                  f"step {last.get('step')}: {_num(last.get('samples_per_s'))} samples/s, MFU {mfu}, "
                  f"loss {_num(last.get('loss'), 4)}"]
    loader = results.get("loader") or {}
    if loader.get("rows"):
        lines += ["", "## Loader from local shards beside the training step", "",
                  "| path | samples/s | per worker / plain floor | x step |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {r['samples_per_s']:.1f} | {r['over_plain_floor']:.2f} | {r['x_train_step']:.2f} |"
                  for k, r in loader["rows"].items()]
        lines.append(f"| training step on the device | {loader['train_step']['samples_per_s']:.1f} | | 1.00 |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the report, the logs and the JSON")
    ap.add_argument("--cpu-dry-run", action="store_true", help="no GPU: every step at tiny sizes on the CPU")
    ap.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default 8 min)")
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_dry_run:
        print("no GPU: run with --cpu-dry-run to check the script itself", file=sys.stderr)
        return 2
    dry = not gpu
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    share = {"sdpa": 0.05, "train": 0.35, "zero2": 0.35, "loader": 0.25}  # of the budget, per step
    steps: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    py = sys.executable

    steps["sdpa"] = run_step("sdpa", [py, "-c", SDPA_PROBE, str(out / "sdpa.json")], out,
                             max(60, share["sdpa"] * args.budget))
    train = [py, str(ROOT / "bench" / "bench_train_gpu.py"), "--json", str(out / "train.json"), "--steps", "15"]
    train += ["--cpu-dry-run"] if dry else ["--compile"]
    steps["train"] = run_step("train", train, out, share["train"] * args.budget)

    work = out / "work"
    manifest = make_shards(work, 32 if dry else 512, 48 if dry else 264)
    steps["zero2"] = run_step("zero2", zero2_command(manifest, work / "zero2", dry), out,
                              max(120, share["zero2"] * args.budget))
    results["zero2"] = zero2_result(work / "zero2")
    loader = [py, str(ROOT / "bench" / "bench_loader.py"), "--source", "factory", "--no-s3", "--json",
              str(out / "loader.json")]
    loader += (["--samples", "32", "--seconds", "1", "--image-size", "32", "--workers", "1", "--mb", "4",
                "--repeat", "1"] if dry else
               # five timed rows (two floors, 1 and 6 workers, the training step) inside the step's share of the budget
               ["--samples", "512", "--seconds", "8", "--device", "cuda", "--model", "vit_b", "--workers", "1", "6",
                "--repeat", "1", "--mb", "64"])
    steps["loader"] = run_step("loader", loader, out, share["loader"] * args.budget)

    for name in ("sdpa", "train", "loader"):
        path = out / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else None
    hw = hardware(torch.device("cuda" if gpu else "cpu"), packages=("torch", "deepspeed"))
    text = report(steps, results, hw, dry)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"dry_run": dry, "steps": steps, "results": results,
                                                    "hardware": hw}, indent=1, default=str))
    print(text)
    return 0 if all(s["status"] == "ok" for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Memory per rank under ZeRO stages 0, 1, 2 and 3: what each rank holds of the model states.

For each stage, a short ``deepspeed --num_gpus 2`` training of the same model (CPU ranks
when there is no GPU) through ``bench/_zero_probe.py``, which is ``launch/train.py`` with a
probe: on the last step, between the backward and the optimizer step, every rank counts
the bytes of the tensors its engine and optimizer hold (each storage once), by role:
parameters, gradients, fp32 master weights, Adam moments; besides, the gradient reduction
buckets DeepSpeed allocates, the peak resident memory of the process (ru_maxrss) and,
on a GPU, torch.cuda.max_memory_allocated.

The model states are compared with stage 0 and with the ZeRO paper's accounting
(Rajbhandari et al., 2020) for mixed precision with Adam, Psi parameters, N ranks:
16 Psi (stage 0), 4 Psi + 12 Psi / N (1), 2 Psi + 14 Psi / N (2), 16 Psi / N (3).

    python bench/bench_zero_memory.py                      # vit_s, 4 runs, ~2-3 min on 2 cores
    python bench/bench_zero_memory.py --size vit_b --json bench/results/zero.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable as a plain script from any directory: the repository root holds `launch/`, `model/`.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import (  # noqa: E402
    MB,
    ROOT,
    deepspeed_command,
    hardware,
    load_average,
    make_shards,
    markdown_table,
    print_header,
    run_to_log,
    training_env,
    write_json,
)

CONFIG = ROOT / "configs" / "debug.yaml"
PROBE = Path(__file__).resolve().parent / "_zero_probe.py"
ROLES = ("params", "grads", "master", "optim")


def paper_bytes_per_param(stage: int, ranks: int) -> float:
    """Model-state bytes per parameter per rank in the ZeRO paper (bf16/fp16 + fp32 Adam, K = 12)."""
    return {0: 16, 1: 4 + 12 / ranks, 2: 2 + 14 / ranks, 3: 16 / ranks}[stage]


def run_stage(stage: int, manifest: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / f"stage{stage}"
    overrides = [
        f"data.manifest={manifest}", f"run.dir={work / f'run{stage}'}", f"model.size={args.size}",
        f"model.patch_size={args.patch_size}", f"data.image_size={args.image_size}",
        f"train.micro_batch_size={args.batch_size}", "train.max_steps=1000", f"train.stop_at_step={args.steps}",
        f"train.bf16={str(args.bf16).lower()}", f"deepspeed.zero_stage={stage}", "data.num_workers=1",
        f"train.log_every={args.steps}",
    ]
    cmd = deepspeed_command(args.ranks, PROBE, CONFIG, overrides, script_args=["--out", str(out)])
    log_path = work / f"stage{stage}.log"
    start = time.perf_counter()
    code = run_to_log(cmd, log_path, args.timeout, env=training_env())
    wall = time.perf_counter() - start
    if code != 0:
        how = code if isinstance(code, str) else f"exited {code}"
        raise RuntimeError(f"ZeRO stage {stage} run {how}:\n{log_path.read_text()[-5000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    return {"stage": stage, "wall_s": wall, "ranks": ranks}


def summarise(run: dict[str, Any], ranks: int) -> dict[str, Any]:
    """The largest rank's numbers (ranks differ by padding only): bytes by role, buckets, RSS."""
    per_rank = [r["after_backward"]["bytes"] for r in run["ranks"]]
    worst = max(range(len(per_rank)), key=lambda i: sum(per_rank[i][k] for k in ROLES))
    r = run["ranks"][worst]
    b = r["after_backward"]["bytes"]
    out = {
        "stage": run["stage"],
        "optimizer": r["optimizer"],
        "rank": r["rank"],
        "numel": r["numel"],
        **{f"{k}_bytes": b[k] for k in ROLES},
        "model_states_bytes": sum(b[k] for k in ROLES),
        "other_bytes": b["other"] - (r["reduce_buckets_bytes"] if run["stage"] == 3 else 0),
        "reduce_buckets_bytes": r["reduce_buckets_bytes"],
        "after_step_model_states_bytes": sum(r["after_step"]["bytes"][k] for k in ROLES),
        "max_rss_bytes": max(x["max_rss_bytes"] for x in run["ranks"]),
        "rss_bytes_at_end": max(x["rss_bytes"] for x in run["ranks"]),
        "paper_bytes_per_param": paper_bytes_per_param(run["stage"], ranks),
        "wall_s": run["wall_s"],
        "detail": r["after_backward"]["detail"],
    }
    if "cuda_max_allocated_bytes" in r:
        out["cuda_max_allocated_bytes"] = max(x["cuda_max_allocated_bytes"] for x in run["ranks"])
    out["bytes_per_param"] = out["model_states_bytes"] / out["numel"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_s", choices=["tiny", "vit_s", "vit_b", "vit_l"], help="model.size")
    parser.add_argument("--image-size", type=int, default=64, help="data.image_size (px)")
    parser.add_argument("--patch-size", type=int, default=16, help="model.patch_size")
    parser.add_argument("--batch-size", type=int, default=2, help="train.micro_batch_size per rank")
    parser.add_argument("--steps", type=int, default=3, help="training steps per stage (probe on the last)")
    parser.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages; 0 is the reference")
    parser.add_argument("--ranks", type=int, default=2, help="deepspeed --num_gpus")
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="train.bf16=false (default bf16)")
    parser.add_argument("--timeout", type=float, default=900, help="per stage, s")
    parser.add_argument("--tmpdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, per-rank JSON)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    # Step 1 would probe before torch's AdamW (stage 0) has created its state: at least 2 steps.
    if not set(stages) <= {0, 1, 2, 3} or args.steps < 2:
        parser.error("--stages: values among 0,1,2,3; --steps >= 2")

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="fusmae-bench-zero-", dir=args.tmpdir))
    try:
        manifest = make_shards(work, locations=2, size=max(48, args.image_size))
        rows = [summarise(run_stage(stage, manifest, work, args), args.ranks) for stage in stages]
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    ref = next((r for r in rows if r["stage"] == 0), rows[0])
    for r in rows:
        r["over_reference"] = r["model_states_bytes"] / ref["model_states_bytes"]
        r["paper_over_reference"] = r["paper_bytes_per_param"] / ref["paper_bytes_per_param"]
        r["rss_over_reference"] = r["max_rss_bytes"] / ref["max_rss_bytes"]
    gpu = "cuda_max_allocated_bytes" in rows[0]
    hw = hardware(device="cuda" if gpu else None, packages=("torch", "deepspeed"))
    hw["load_avg_1m"] = f"{load_before} at start, {load_average()} at end"
    setup = {
        "model": args.size, "params": rows[0]["numel"], "params_M": round(rows[0]["numel"] / 1e6, 1),
        "image_size": args.image_size, "patch_size": args.patch_size, "micro_batch": args.batch_size,
        "ranks": args.ranks, "precision": "bf16" if args.bf16 else "fp32", "steps": args.steps,
        "optimizer": "torch AdamW" + ("" if gpu else " (deepspeed.torch_adam: automatic on CPU)"),
        "probe": "last step, after backward, before optimizer step", "reference": f"stage {ref['stage']}",
    }

    print_header(f"ZeRO memory per rank: {args.size}, {args.ranks} ranks", setup, hw)
    header = ["ZeRO stage", "optimizer", "params MB", "grads MB", "fp32 master MB", "Adam m, v MB",
              "model states MB", "bytes / param", f"/ stage {ref['stage']}", "paper", "reduce buckets MB",
              "peak RSS MB", "RSS / ref", "RSS at end MB"]
    if gpu:
        header.append("CUDA max allocated MB")
    table = []
    for r in rows:
        row = [r["stage"], r["optimizer"], *(f"{r[f'{k}_bytes'] / MB:.1f}" for k in ROLES),
               f"{r['model_states_bytes'] / MB:.1f}", f"{r['bytes_per_param']:.2f}", f"{r['over_reference']:.2f}",
               f"{r['paper_over_reference']:.2f}" if args.bf16 else "–", f"{r['reduce_buckets_bytes'] / MB:.0f}",
               f"{r['max_rss_bytes'] / MB:.0f}", f"{r['rss_over_reference']:.2f}", f"{r['rss_bytes_at_end'] / MB:.0f}"]
        if gpu:
            row.append(f"{r['cuda_max_allocated_bytes'] / MB:.0f}")
        table.append(row)
    print(markdown_table(header, table, "rl" + "r" * (len(header) - 2)))
    print(f"\nPer rank (the larger of the {args.ranks}), MB = 10^6 bytes. Model states: the tensors the engine and "
          "optimizer hold between the backward and the optimizer step of the last step, each storage once: "
          "parameters as the forward uses them (ZeRO-3: the rank's partition plus parameters below DeepSpeed's "
          "persistence threshold, kept whole), gradients (the reduced partition under ZeRO 1-3), the fp32 "
          "master weights and Adam's two moments. Paper: the ZeRO paper's model-state ratio for mixed precision "
          f"(16, 4 + 12/N, 2 + 14/N, 16/N bytes per parameter, N = {args.ranks}). Reduce buckets: DeepSpeed's "
          "gradient reduction buffers (reduce_bucket_size elements, 5e8 by default): ZeRO-1/2 allocate them "
          "during each backward, ZeRO-3 keeps them; on a CPU they are virtual memory until written, on a GPU "
          "they are allocated in full. Peak RSS: the whole process's peak resident memory (libraries, "
          "activations, data loading, and the full fp32 model every rank builds before DeepSpeed partitions it); "
          "RSS at end: resident memory after the last step.")
    for r in rows:
        extra = {k: v for k, v in r["detail"]["other"].items() if k != "optimizer.ipg_buckets" and v >= 0.05 * MB}
        if extra:
            print(f"- stage {r['stage']}: other tensors held: "
                  + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in extra.items()))
    write_json(args.json, {"setup": setup, "hardware": hw, "stages": rows})


if __name__ == "__main__":
    main()

"""Training throughput and model FLOPs utilisation of the ViT-B recipe on one GPU: SDPA vs eager.

Builds the model of ``configs/vit_b.yaml`` (ViT-B/16 encoder, xattn fusion, 224 x 224 px,
2 S1 + 13 S2 bands, micro batch 64) twice with identical weights, ``fused_attn=True``
(SDPA) and ``False`` (eager), and times full training steps on synthetic batches already
in GPU memory (no data loading, no augmentation): forward and backward under bf16
autocast, gradient clipping, fused AdamW. The two variants' steps are interleaved so
that both see the same clocks and temperature.

MFU = samples/s x training FLOPs per sample (``model.flops.estimate_flops_per_sample``,
matmuls only, 3x forward) / the GPU's dense bf16 peak (``launch.training.metrics.PEAK_BF16_FLOPS``,
or ``--peak-tflops``).

Without a GPU it prints "no GPU: skipped" and exits 0 (with --json, writes {"skipped": ...}), unless
``--cpu-dry-run``: the same code on the CPU at tiny sizes (tiny model, 32 px, float32), which is how
the tests keep `bench/gpu_check.sh` working between GPU runs. ``--compile`` adds SDPA under
``torch.compile`` as a third variant (its error is reported if it does not compile).

    python bench/bench_train_gpu.py                        # ~1-2 min on an H100
    python bench/bench_train_gpu.py --batch-size 128 --json bench/results/train_gpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

# Runnable as a plain script from any directory: the repository root holds `launch/`, `model/`.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import ROOT, hardware, markdown_table, print_header, write_json  # noqa: E402

TITLE = "Fus-MAE training on one GPU: samples/s and MFU, SDPA vs eager"
VARIANTS = (("sdpa", True, "SDPA (fused_attn=True)"), ("eager", False, "eager (fused_attn=False)"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "vit_b.yaml", help="the training recipe")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.micro_batch_size")
    parser.add_argument("--image-size", type=int, default=None, help="default: the recipe's data.image_size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU, TFLOP/s (default: launch.training.metrics.PEAK_BF16_FLOPS)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--compile", action="store_true", help="add SDPA under torch.compile as a variant")
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU: run the same steps on CPU, tiny")
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(f"## {TITLE}\n\nno GPU: skipped")
        write_json(args.json, {"skipped": "no GPU"})
        return 0

    from launch.config import load_config
    from launch.training.metrics import peak_flops
    from model import FusMAE
    from model.config import STANDARD_CHANNELS
    from model.flops import estimate_flops_per_sample

    overrides = ["data.manifest=unused"]  # the recipe's model and batch only; no data is read
    dry = args.cpu_dry_run and not torch.cuda.is_available()
    if dry:
        overrides += ["model.size=tiny", "model.patch_size=8", "data.image_size=32"]
        args.batch_size, args.steps, args.warmup = args.batch_size or 2, min(args.steps, 3), min(args.warmup, 1)
    elif args.image_size:
        overrides.append(f"data.image_size={args.image_size}")
    cfg = load_config(str(args.config), overrides)
    for mod, n in STANDARD_CHANNELS.items():  # no manifest here: the recipe's bands, else the full products'
        if getattr(cfg.model, f"{mod}_channels") is None:
            setattr(cfg.model, f"{mod}_channels", n)
    batch = args.batch_size or cfg.train.micro_batch_size
    size = cfg.data.image_size
    device = torch.device("cpu" if dry else "cuda")
    gpu = "cpu (dry run)" if dry else torch.cuda.get_device_name(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (None if dry else peak_flops(gpu))
    flops_per_sample = estimate_flops_per_sample(cfg.model, size)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # In memory: a fixed batch of normalised-looking values (the model cares about shapes only).
    g = torch.Generator(device=device).manual_seed(0)
    s1 = torch.randn(batch, cfg.model.s1_channels, size, size, device=device, generator=g)
    s2 = torch.randn(batch, cfg.model.s2_channels, size, size, device=device, generator=g)

    # Identical weights, only the attention kernel differs.
    variants = {}
    reference = None
    chosen = VARIANTS + ((("compile", True, "SDPA + torch.compile"),) if args.compile else ())
    compile_error = None
    for name, fused, _ in chosen:
        torch.manual_seed(cfg.train.seed)
        net = FusMAE(replace(cfg.model, fused_attn=fused))
        if reference is not None:
            net.load_state_dict(reference)
        reference = net.state_dict()
        net.to(device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.peak_lr(1), betas=tuple(cfg.train.betas),
                                weight_decay=cfg.train.weight_decay, fused=not dry)
        run = torch.compile(net) if name == "compile" else net
        variants[name] = {"net": run, "params": net, "opt": opt, "times": [], "peak_mem": 0}

    def sync() -> None:
        if not dry:
            torch.cuda.synchronize(device)

    def step(net: FusMAE, opt: torch.optim.Optimizer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not dry):
            loss = net(s1, s2).loss
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup + args.steps):
        for name, v in list(variants.items()):
            sync()
            if not dry:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            try:
                step(v["net"], v["opt"])
            except Exception as err:  # noqa: BLE001 - torch.compile may not work here: say why, keep the rest
                if name != "compile":
                    raise
                compile_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                del variants[name]
                continue
            sync()
            if i >= args.warmup:
                v["times"].append(time.perf_counter() - start)
            v["peak_mem"] = max(v["peak_mem"], 0 if dry else torch.cuda.max_memory_allocated(device))

    results = {}
    for name, v in variants.items():
        median = statistics.median(v["times"])  # robust to the odd hiccup
        sps = batch / median
        results[name] = {
            "step_ms_median": 1e3 * median,
            "step_ms_mean": 1e3 * statistics.fmean(v["times"]),
            "samples_per_s": sps,
            "tflops": sps * flops_per_sample / 1e12,
            "mfu": sps * flops_per_sample / peak if peak else None,
            "peak_memory_gb": v["peak_mem"] / 1e9,
        }
    ratio = results["sdpa"]["samples_per_s"] / results["eager"]["samples_per_s"]
    setup = {
        "config": Path(args.config).name, "model": cfg.model.size, "fusion": cfg.model.fusion,
        "decoder": cfg.model.decoder, "image_size": size, "patch_size": cfg.model.patch_size,
        "bands": f"{cfg.model.s1_channels}+{cfg.model.s2_channels}", "mask_ratio": cfg.model.mask_ratio,
        "batch_size": batch, "steps": args.steps, "warmup": args.warmup,
        "precision": "float32" if dry else "bf16 autocast, fp32 weights",
        "optimizer": "AdamW" if dry else "fused AdamW", "grad_clip": cfg.train.grad_clip,
        "data": "synthetic, in memory" + (" (CPU dry run: tiny, float32)" if dry else ""),
        "gflops_per_sample": round(flops_per_sample / 1e9, 1),
        "peak_tflops": round(peak / 1e12) if peak else "unknown (pass --peak-tflops)",
    }
    hw = hardware(device=device, packages=("torch",))

    print_header(TITLE, setup, hw)
    print(markdown_table(
        ["attention", "step ms (median)", "step ms (mean)", "samples/s", "TFLOP/s", "MFU", "peak memory GB"],
        [[label, f"{results[n]['step_ms_median']:.1f}", f"{results[n]['step_ms_mean']:.1f}",
          f"{results[n]['samples_per_s']:.1f}", f"{results[n]['tflops']:.0f}",
          "–" if results[n]["mfu"] is None else f"{100 * results[n]['mfu']:.1f}%",
          f"{results[n]['peak_memory_gb']:.1f}"] for n, _, label in chosen if n in results]))
    if compile_error:
        print(f"\ntorch.compile did not run: {compile_error}")
    print(f"\nSDPA / eager throughput (samples/s from the median step): {ratio:.2f}x. MFU counts the model's "
          "matmul FLOPs (PaLM's convention: no recomputation, no norms or softmax) against the dense bf16 peak; "
          "no data loading, so this is the ceiling the input pipeline has to feed.")
    write_json(args.json, {"setup": setup, "hardware": hw, "results": results, "sdpa_over_eager": ratio,
                           "compile_error": compile_error, "dry_run": dry})
    return 0


if __name__ == "__main__":
    sys.exit(main())

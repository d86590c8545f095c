"""Training throughput of Fus-MAE with SDPA attention versus the eager reference path.

Times full training steps (forward + backward + AdamW) of two copies of the same
model, fused_attn=True and fused_attn=False, interleaving their steps so that both
see the same machine state (thermal throttling, other load), and prints a Markdown
table with the hardware description.

    python bench/bench_attention.py                      # tiny model on CPU, < 1 min
    python bench/bench_attention.py --size vit_s --device cuda --dtype bf16 --json bench/results/h100.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

# Runnable as a plain script from any directory: the repository root holds `model/`.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from common import hardware, print_header, write_json  # noqa: E402
from model import FusMAE, FusMAEConfig  # noqa: E402

DEFAULT_BATCH = {"tiny": 32, "vit_s": 8}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "vit_s"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULT_BATCH}")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--fusion", default="xattn")
    parser.add_argument("--decoder", default="separate")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    batch = args.batch_size or DEFAULT_BATCH[args.size]
    cfg = FusMAEConfig.preset(
        args.size, fusion=args.fusion, decoder=args.decoder, img_size=args.img_size, patch_size=args.patch_size
    )
    torch.manual_seed(0)
    s1 = torch.randn(batch, cfg.s1_channels, args.img_size, args.img_size, device=device)
    s2 = torch.randn(batch, cfg.s2_channels, args.img_size, args.img_size, device=device)

    # Two models with identical weights that differ only in the attention kernel.
    variants = {}
    reference = None
    for name, fused in (("sdpa", True), ("eager", False)):
        torch.manual_seed(0)
        net = FusMAE(replace(cfg, fused_attn=fused))
        if reference is not None:
            net.load_state_dict(reference)
        reference = net.state_dict()
        net.to(device).train()
        variants[name] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4), [])

    def step(net: FusMAE, opt: torch.optim.Optimizer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = net(s1, s2).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup + args.steps):
        for net, opt, times in variants.values():
            sync(device)
            start = time.perf_counter()
            step(net, opt)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)

    results = {}
    for name, (_, _, times) in variants.items():
        # Median step time: robust to the odd hiccup of a shared machine.
        median = statistics.median(times)
        results[name] = {
            "step_ms_median": 1e3 * median,
            "step_ms_mean": 1e3 * statistics.fmean(times),
            "samples_per_s": batch / median,
        }
    ratio = results["sdpa"]["samples_per_s"] / results["eager"]["samples_per_s"]
    hw = hardware(device)
    setup = {
        "size": args.size, "fusion": cfg.fusion, "decoder": cfg.decoder, "img_size": args.img_size,
        "patch_size": cfg.patch_size, "tokens_per_modality": (args.img_size // cfg.patch_size) ** 2,
        "mask_ratio": cfg.mask_ratio, "batch_size": batch, "steps": args.steps, "warmup": args.warmup,
        "device": args.device, "dtype": args.dtype,
    }

    print_header("Fus-MAE training step: SDPA vs eager attention", setup, hw)
    print("| attention | step ms (median) | step ms (mean) | samples/s |")
    print("|---|---:|---:|---:|")
    for name, label in (("sdpa", "SDPA (fused_attn=True)"), ("eager", "eager (fused_attn=False)")):
        r = results[name]
        print(f"| {label} | {r['step_ms_median']:.1f} | {r['step_ms_mean']:.1f} | {r['samples_per_s']:.1f} |")
    print(f"\nSDPA / eager throughput (samples/s from the median step): {ratio:.2f}x")

    write_json(args.json, {"setup": setup, "hardware": hw, "results": results, "sdpa_over_eager": ratio})


if __name__ == "__main__":
    main()

"""Does pretraining learn anything, at CPU scale? Pretrained vs random initialisation, xattn vs S2 only.

1. Pretrains the tiny Fus-MAE (configs/debug.yaml, 2 CPU ranks, ZeRO-2) on a synthetic SSL4EO-S12 archive
   sharded by the real pipeline, once with fusion=xattn and once S2 only, for ``--steps`` steps.
2. Probes each encoder and a randomly initialised one of the same architecture (linear probe, 3 seeds,
   mean and CLS pooling) on a downstream task built so that per-band means cannot solve it: every patch
   holds three land-cover classes as three parallel stripes (wavy boundaries, random orientation and
   order), and the label is the class of the *middle* stripe. The three classes' areas, hence every
   band's mean, are the same whichever is in the middle: the label is in the spatial arrangement. On half
   of the patches a cloud hides the middle stripe from S2 (bright, flat, every band), so that there only
   S1 (which clouds do not stop) sees it: the task needs both modalities. Land cover, spectra and S1
   backscatter come from `pipeline.synthetic.scene` (the synthetic archives' own renderer).
3. Reports each probe's test macro mAP as mean ± standard deviation over the seeds, and the gaps
   (pretrained - random) with their spread; and the reconstruction loss of each pretrained model on
   masked patches of the training shards against the trivial baseline of predicting every masked
   patch's own mean (per band): below 1.0 the decoder predicts structure inside patches.

    python bench/bench_pretraining.py                 # ~10 min on 2 cores
    python bench/bench_pretraining.py --steps 100     # quicker, weaker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent),
                str(Path(__file__).resolve().parents[1] / "tests")]

from common import ROOT, deepspeed_command, hardware, make_shards, print_header, training_env, write_json  # noqa: E402

TITLE = "Pretraining vs random initialisation, xattn vs S2 only: linear probe on a spatial, two-modality task"
DEBUG = ROOT / "configs" / "debug.yaml"
DEBUG_LINEAR = ROOT / "configs" / "eval" / "debug_linear.yaml"


# -- the downstream task ------------------------------------------------------------------------


def stripes_sample(number: int, rng: np.random.Generator, hw: int, cloud_p: float):
    """One patch: three classes as wavy parallel stripes; label = the middle one; maybe a cloud over it."""
    from pipeline.shards import Sample, make_key
    from pipeline.synthetic.scene import LAND_COVER_CLASSES, Scene, render_s1, render_s2

    k = len(LAND_COVER_CLASSES)
    order = rng.choice(k, size=3, replace=False)
    y, x = np.mgrid[0:hw, 0:hw] / hw
    phase, amp = rng.uniform(0, 2 * np.pi, 2), rng.uniform(0.02, 0.06, 2)
    u = x + amp[0] * np.sin(2 * np.pi * 2 * y + phase[0])  # wavy boundaries
    cuts = np.array([1 / 3, 2 / 3]) + rng.uniform(-0.04, 0.04, 2)
    stripe = np.digitize(u, cuts)  # 0, 1, 2 across the patch
    if rng.random() < 0.5:
        stripe = stripe.T
    classes = order[stripe].astype(np.uint8)
    scene = Scene(classes, np.zeros((hw, hw), np.float32), 0)
    s2 = render_s2(rng, scene, [1], "L1C")[0]  # summer
    s1 = render_s1(rng, scene, [1])[0]
    cloudy = bool(rng.random() < cloud_p)
    if cloudy:  # thick cloud over the middle stripe: bright and flat in every band, S1 sees through
        s2[:, stripe == 1] = rng.uniform(5500, 6500) + rng.normal(0, 60, (s2.shape[0], int((stripe == 1).sum())))
    s2 = np.clip(np.rint(s2), 1, 10000).astype(np.int16)
    vector = [int(c == order[1]) for c in range(k)]
    meta = {"sample_id": f"{number:06d}", "number": number, "source": "bench-stripes", "label_vector": vector,
            "labels": [LAND_COVER_CLASSES[order[1]]], "label_index": int(order[1]), "cloudy": cloudy}
    return Sample(make_key("stripes", f"{number:06d}"), s1.astype(np.float32), s2, meta)


def make_task(work: Path, sizes: dict[str, int], hw: int, cloud_p: float) -> dict[str, str]:
    from pipeline.sources.base import S2_L1C_BANDS
    from pipeline.synthetic.scene import LAND_COVER_CLASSES
    from shardfactory import make_shard_set

    out = {}
    for i, (split, n) in enumerate(sizes.items()):
        out[split] = make_shard_set(
            str(work / "task" / split), [16] * (n // 16) + ([n % 16] if n % 16 else []), hw=hw, seed=100 + i,
            split=split, s2_bands=list(S2_L1C_BANDS),
            sample_fn=lambda number, rng: stripes_sample(number, rng, hw, cloud_p),
            source={"name": "bench-stripes", "label_classes": list(LAND_COVER_CLASSES)})
    return out


# -- pretraining and probing --------------------------------------------------------------------


def pretrain(work: Path, manifest: Path, fusion: str, steps: int, size: int) -> Path:
    run = work / f"pretrain-{fusion}"
    cmd = deepspeed_command(2, ROOT / "launch" / "train.py", DEBUG, [
        f"data.manifest={manifest}", f"model.fusion={fusion}", f"data.image_size={size}", "data.num_workers=1",
        "train.micro_batch_size=8", f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 15)}",
        f"train.log_every={max(1, steps // 10)}", f"checkpoint.dir={run / 'ckpt'}", f"checkpoint.every_steps={steps}",
        f"run.dir={run}"])
    with open(work / f"pretrain-{fusion}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=training_env())
    if proc.returncode != 0:
        raise RuntimeError(f"pretraining ({fusion}) exited {proc.returncode}; see {work}/pretrain-{fusion}.log")
    return run / "ckpt"


def probe(task: dict[str, str], pretrained: str, fusion: str, pool: str, seed: int, work: Path, size: int,
          epochs: int) -> dict[str, Any]:
    from launch.config import load_eval_config
    from launch.evaluation import evaluate

    name = f"{Path(pretrained).parent.name if pretrained != 'none' else 'random-' + fusion}-{pool}-seed{seed}"
    overrides = [f"data.train_manifest={task['train']}", f"data.val_manifest={task['val']}",
                 f"data.test_manifest={task['test']}", f"eval.pretrained={pretrained}", f"eval.pool={pool}",
                 f"eval.seed={seed}", f"eval.epochs={epochs}", f"data.image_size={size}",
                 f"eval.feature_cache_dir={work / 'features'}", f"run.dir={work / 'eval' / name}"]
    if pretrained == "none":
        overrides += [f"model.fusion={fusion}", "model.patch_size=8"]
    (work / "eval").mkdir(exist_ok=True)
    with open(work / "eval" / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):  # per-run tables
        return evaluate(load_eval_config(str(DEBUG_LINEAR), overrides))


def reconstruction(ckpt: Path, manifest: Path, size: int, batches: int) -> dict[str, float]:
    """Masked-patch MSE of the pretrained model and of predicting each masked patch's own per-band mean."""
    import torch

    from launch.data.augment import DeviceAugment
    from launch.data.loader import LoaderSettings, ShardLoader
    from launch.evaluation.pretrained import client_state, consolidate
    from model import FusMAE, FusMAEConfig
    from model.embed import patchify
    from pipeline.manifest import load_manifest

    tag = json.loads((ckpt / "latest").read_text())["tag"]
    client = client_state(str(ckpt), tag)
    state, _ = consolidate(str(ckpt), tag, client)
    cfg = FusMAEConfig(**{**client["config"]["model"], "img_size": size})
    net = FusMAE(cfg)
    net.load_state_dict({k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()})
    net.eval()
    m = load_manifest(str(manifest))
    augment = DeviceAugment.for_manifest(m, size)
    loader = ShardLoader(m, LoaderSettings(num_workers=0, shuffle_buffer=8), micro_batch_size=16, seed=7)
    sums = {"model_s1": 0.0, "model_s2": 0.0, "mean_s1": 0.0, "mean_s2": 0.0}
    torch.manual_seed(0)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == batches:
                break
            s1, s2, _ = augment({k: v for k, v in batch.items() if k not in ("crop", "flip")}, "cpu")
            out = net(s1 if cfg.uses_s1 else None, s2 if cfg.uses_s2 else None)
            for mod, img, loss, mask in (("s1", s1, out.loss_s1, out.mask_s1), ("s2", s2, out.loss_s2, out.mask_s2)):
                if loss is None:
                    continue
                patches = patchify(img, cfg.patch_size)  # (B, L, p*p*C), channel fastest
                B, L, _ = patches.shape
                per = patches.reshape(B, L, -1, img.shape[1])
                baseline = per.var(dim=2, unbiased=False).mean(-1)  # MSE of the patch's own per-band mean
                sums[f"model_{mod}"] += float(loss)
                sums[f"mean_{mod}"] += float((baseline * mask).sum() / mask.sum())
    n = min(batches, i + 1)
    return {k: v / n for k, v in sums.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per fusion")
    ap.add_argument("--size", type=int, default=48, help="image side in px (a multiple of 8)")
    ap.add_argument("--locations", type=int, default=64, help="SSL4EO locations to pretrain on (4 samples each)")
    ap.add_argument("--task-samples", type=int, nargs=3, default=[192, 96, 96], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--cloud", type=float, default=0.5, help="fraction of task patches with a cloud on S2")
    ap.add_argument("--epochs", type=int, default=40, help="linear probe epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-pretraining-") as tmp:
        work = Path(tmp)
        manifest = make_shards(work, args.locations, args.size)
        task = make_task(work, dict(zip(("train", "val", "test"), args.task_samples)), args.size, args.cloud)
        rows: list[dict[str, Any]] = []
        recon = {}
        for fusion in ("xattn", "s2"):
            ckpt = pretrain(work, manifest, fusion, args.steps, args.size)
            recon[fusion] = reconstruction(ckpt, manifest, args.size, batches=8)
            for init, pretrained in (("pretrained", str(ckpt)), ("random", "none")):
                for pool in ("mean", "cls"):
                    values = [probe(task, pretrained, fusion, pool, s, work, args.size, args.epochs)["map_macro"]
                              for s in range(args.seeds)]
                    rows.append({"fusion": fusion, "init": init, "pool": pool, "map_macro": values})
    for r in rows:
        r["mean"], r["std"] = float(np.mean(r["map_macro"])), float(np.std(r["map_macro"], ddof=1))
    gaps = []
    for fusion in ("xattn", "s2"):
        for pool in ("mean", "cls"):
            a, b = (next(r for r in rows if r["fusion"] == fusion and r["init"] == i and r["pool"] == pool)
                    for i in ("pretrained", "random"))
            d = np.asarray(a["map_macro"]) - np.asarray(b["map_macro"])  # paired by seed (same subset and head init)
            gaps.append({"fusion": fusion, "pool": pool, "gap_mean": float(d.mean()), "gap_std": float(d.std(ddof=1))})
    setup = {"pretrain": f"configs/debug.yaml, {args.steps} steps, batch 8 x 2 ranks, {args.size} px, "
                         f"{args.locations * 4} SSL4EO samples", "task": f"middle-stripe class of 6, "
                         f"{'/'.join(map(str, args.task_samples))} samples, {args.cloud:.0%} with a cloud on S2",
             "probe": f"linear, {args.epochs} epochs, {args.seeds} seeds", "seconds": round(time.perf_counter() - t0)}
    hw = hardware()
    print_header(TITLE, setup, hw)
    print("| fusion | init | pool | test mAP macro (mean ± std over seeds) |\n|---|---|---|---:|")
    for r in rows:
        print(f"| {r['fusion']} | {r['init']} | {r['pool']} | {r['mean']:.3f} ± {r['std']:.3f} |")
    print("\n| fusion | pool | pretrained - random (paired by seed) |\n|---|---|---:|")
    for g in gaps:
        print(f"| {g['fusion']} | {g['pool']} | {g['gap_mean']:+.3f} ± {g['gap_std']:.3f} |")
    print("\n| fusion | masked-patch MSE, model (S1 / S2) | predicting each patch's mean (S1 / S2) | model / baseline |"
          "\n|---|---|---|---|")
    for fusion, r in recon.items():
        s1 = f"{r['model_s1']:.3f} / " if fusion != "s2" else "- / "
        b1 = f"{r['mean_s1']:.3f} / " if fusion != "s2" else "- / "
        ratio = " / ".join(f"{r[f'model_{m}'] / r[f'mean_{m}']:.2f}" for m in ("s1", "s2") if r[f"mean_{m}"])
        print(f"| {fusion} | {s1}{r['model_s2']:.3f} | {b1}{r['mean_s2']:.3f} | {ratio} |")
    print("\nFeatures that only carry band means know which three classes a patch holds, not which is in the "
          "middle; above that, a probe needs the arrangement. Gaps are paired by seed (same head initialisation "
          "and sample order). Reconstruction: normalised units, masked patches of the training shards.")
    write_json(args.json, {"setup": setup, "hardware": hw, "rows": rows, "gaps": gaps, "reconstruction": recon})
    return 0


if __name__ == "__main__":
    sys.exit(main())

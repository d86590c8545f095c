"""DeepSpeed pretraining end to end: real `deepspeed` launches with 2 CPU ranks, real S3 (moto)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import DEBUG, S3_ENV, deepspeed, fresh_s3fs, ssl4eo_shards, torchrun
from launch.training.keylog import read_key_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FAULTY_TRAIN = "tests/launch/training/faulty_train.py"
STATE_TRAIN = "tests/launch/training/state_train.py"
KEY_ID, SECRET = "AKIAFUSMAEDISTINCT42", "fusmae-distinctive-secret-7f3a9c"

def train(ranks: int, *overrides: str, env: dict | None = None, check: bool = True,
          script: str = "launch/train.py") -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N launch/train.py --config configs/debug.yaml overrides...`, as a user runs it."""
    return deepspeed(ranks, script, "--config", DEBUG, *overrides, env=env, check=check)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small SSL4EO-S12 shard set made by the real pipeline: 24 samples in uneven shards of 5,5,5,5,4."""
    shards = ssl4eo_shards(tmp_path_factory.mktemp("train_data"))
    m = json.loads((shards / "manifest.json").read_text())
    assert [s["samples"] for s in m["shards"]] == [5, 5, 5, 5, 4]
    return shards


def common(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.manifest={shards / 'manifest.json'}", f"run.dir={run_dir}", "train.log_every=1",
            "data.num_workers=2", *extra]


def test_zero2_resume_from_s3_reproduces_the_uninterrupted_losses(shards, tmp_path, s3_bucket):
    # uninterrupted, checkpoints to a local folder
    a = tmp_path / "a"
    first = train(2, *common(shards, a, "train.max_steps=8", "checkpoint.every_steps=4", f"checkpoint.dir={a / 'ckpt'}",
                             "train.log_sample_keys=true"))
    full = metrics(a)
    assert [r["step"] for r in full] == list(range(1, 9))
    # MAE's rule: configs/debug.yaml's base_lr 0.032 x global batch (4 per rank x 2 ranks) / 256 = 1e-3, the
    # rate after the 2 warm-up steps; the schedule then decays it (cosine, to min_lr 0)
    peak = 0.032 * 4 * 2 / 256
    assert "peak lr 0.001 = base_lr 0.032 x global batch 8 (4 x 1 accumulation x 2 ranks) / 256" in first.stdout
    assert max(r["lr"] for r in full) == pytest.approx(peak, rel=1e-9)
    assert full[-1]["lr"] < full[2]["lr"] < peak
    # the bands came from the manifest and the run's config.yaml says which
    saved = (a / "config.yaml").read_text()
    assert "s2_channels: 13" in saved and "- B10" in saved and "input bands: S1 ['VV', 'VH']" in first.stdout
    for r in full:
        for key in ("loss", "loss_s1", "loss_s2", "lr", "samples_per_s"):
            assert np.isfinite(r[key])

    # The same run stopped at step 3 and at step 6, each time resumed from S3 with resume=auto. Its checkpoint
    # credentials come from the recipe (storage_options), distinctive values the S3 endpoint accepts like any.
    b = tmp_path / "b"
    ckpt = f"{s3_bucket}/runs/b"
    recipe = yaml.safe_load(Path(DEBUG).read_text())
    recipe["checkpoint"]["storage_options"] = {"key": KEY_ID, "secret": SECRET}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = common(shards, b, "train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=2",
                  f"checkpoint.dir={ckpt}", "train.log_sample_keys=true")
    runs = [deepspeed(2, "launch/train.py", "--config", str(tmp_path / "recipe.yaml"), *args, *extra)
            for extra in (["train.stop_at_step=3"], ["train.stop_at_step=6", "resume=auto"], ["resume=auto"])]
    assert "at step 3" in runs[1].stdout and "at step 6" in runs[2].stdout
    resumed = metrics(b)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    # exact resume: every logged loss bit for bit, and the same samples at the same steps on every rank
    for key in ("loss", "loss_s1", "loss_s2", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key
    for rank in (0, 1):
        keys_full, keys_resumed = read_key_log(str(a), rank), read_key_log(str(b), rank)
        assert [k["step"] for k in keys_full] == list(range(1, 9))
        assert keys_resumed == keys_full and all(len(k["keys"]) == 4 for k in keys_full)
    seen = {key for rank in (0, 1) for k in read_key_log(str(a), rank) for key in k["keys"]}
    assert seen <= set(pd.read_parquet(shards / "index.parquet")["key"]) and len(seen) > 12

    # keep=2: only the two newest committed checkpoints remain; the export and the pictures are there
    fs = fresh_s3fs()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(ckpt) if "step-" in p) == ["step-00000006", "step-00000008"]
    assert fs.exists(f"{ckpt}/encoder/model.safetensors") and fs.exists(f"{ckpt}/encoder/config.json")
    assert list(b.glob("reconstruction-step-*.png"))
    # No credential anywhere the runs wrote or printed: every byte of every file, local and in the bucket
    # (DeepSpeed's .pt files included: they hold the config), and every line of output.
    written = [p.read_bytes() for p in b.rglob("*") if p.is_file()]
    written += [fs.cat_file(p) for p in fs.find(ckpt)]
    assert len(written) > 20 and any(p.endswith(".pt") for p in fs.find(ckpt))
    printed = [(r.stdout + r.stderr).encode() for r in runs]
    for secret in (SECRET, KEY_ID, S3_ENV["AWS_SECRET_ACCESS_KEY"]):
        for blob in written + printed:
            assert secret.encode() not in blob


def test_zero3_bf16_trains_checkpoints_and_exports(shards, tmp_path):
    run = tmp_path / "z3"
    train(2, *common(shards, run, "deepspeed.zero_stage=3", "train.bf16=true", "train.max_steps=4",
                         "checkpoint.every_steps=2", f"checkpoint.dir={run / 'ckpt'}", "deepspeed.monitor=csv"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    # the same scalars reach DeepSpeed's own monitor: its CSV files (run.dir/deepspeed/train_<name>.csv, columns
    # step and <name>, DeepSpeed's csvMonitor layout) hold exactly what metrics.jsonl holds
    for key in ("loss", "loss_s1", "loss_s2", "lr", "samples_per_s"):
        logged = pd.read_csv(run / "deepspeed" / f"train_{key}.csv")
        assert list(logged.columns) == ["step", key]
        assert logged["step"].tolist() == [1, 2, 3, 4] and logged[key].tolist() == [r[key] for r in rows], key
    # the pictures show what they say: a 4 x 6 grid of square panels (4 samples of the micro batch; S2 and S1 each
    # as input, masked input, reconstruction), none of them flat; about 75% of a masked panel is the one fill colour
    # (model.mask_ratio 0.75: 12 of the 16 patches hidden), and the reconstruction is not the input
    pictures = sorted(run.glob("reconstruction-step-*.png"))
    assert [p.name for p in pictures] == ["reconstruction-step-00000002.png", "reconstruction-step-00000004.png"]
    grid = picture_panels(pictures[-1])
    assert [len(row) for row in grid] == [6] * 4
    for row in grid:
        for panel in row:
            assert abs(panel.shape[0] - panel.shape[1]) <= 2 and panel.shape[0] > 50
            assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 50
        for first in (0, 3):  # S2, then S1
            source, masked, recon = (p.astype(int) for p in row[first: first + 3])
            colours, counts = np.unique(masked.reshape(-1, 3), axis=0, return_counts=True)
            assert 0.65 < counts.max() / counts.sum() < 0.85
            # where the masked panel shows the input, the input panel and the reconstruction (visible patches
            # pasted back) show it too; where it is hidden, the reconstruction is the model's, not the input
            shown = (masked != colours[counts.argmax()]).any(axis=-1)
            same = lambda x, y: (np.abs(x - y) <= 8).all(axis=-1).mean()  # noqa: E731 (resampling at the edges)
            assert same(masked[shown], source[shown]) > 0.8 and same(recon[shown], source[shown]) > 0.8
            assert same(recon[~shown], source[~shown]) < 0.2
    from launch.training.export import load_encoder

    net, meta = load_encoder(str(run / "ckpt" / "encoder"))
    assert meta["model"]["fusion"] == "xattn" and meta["step"] == 4
    s1, s2 = torch.randn(2, 2, 32, 32), torch.randn(2, 13, 32, 32)
    feats = net.encode(s1, s2)
    assert feats.shape == (2, net.cfg.embed_dim) and torch.isfinite(feats).all()
    # the exported weights are the trained ones, not the initialisation
    from safetensors.torch import load_file
    from model import FusMAE

    fresh = FusMAE(net.cfg).encoder_state_dict()
    trained = load_file(str(run / "ckpt" / "encoder" / "model.safetensors"))
    assert any(not torch.equal(trained[k], fresh[k].float()) for k in trained if k.startswith("blocks"))


def runs(line: np.ndarray, min_length: int) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-d mask at least ``min_length`` long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])))
    return [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_length]


def picture_panels(path: Path) -> list[list[np.ndarray]]:
    """The image panels of a figure, found in its pixels: blocks of non-white separated by the white margins
    (titles are lines of text, much shorter than a panel, and are left out). Rows of (H, W, 3) uint8 crops."""
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    ink = (img < 250).any(axis=-1)
    columns = runs(ink[ink.shape[0] // 2:].any(axis=0), 20)  # the lower half: panels only, no titles
    grid: list[list[np.ndarray]] = []
    for c0, c1 in columns:
        found = runs(ink[:, c0:c1].any(axis=1), (c1 - c0) // 2)
        for i, (r0, r1) in enumerate(found):
            if len(grid) <= i:
                grid.append([])
            grid[i].append(img[r0 + 3: r1 - 3, c0 + 3: c1 - 3])  # inside the frame
    return grid


def test_rank_killed_during_upload_leaves_previous_checkpoint(shards, tmp_path):
    run = tmp_path / "kill"
    ckpt = run / "ckpt"
    args = common(shards, run, "train.max_steps=4", "checkpoint.every_steps=2", f"checkpoint.dir={ckpt}")
    proc = train(2, *args, env={"FAULTY_UPLOAD": "step-00000004:1"}, check=False, script=FAULTY_TRAIN)
    assert proc.returncode != 0 and "fault injection: rank 1 exits during the upload of step-00000004" in proc.stdout + proc.stderr
    assert json.loads((ckpt / "latest").read_text())["tag"] == "step-00000002"
    proc = train(2, *args, "resume=auto")
    assert "at step 2" in proc.stdout
    assert json.loads((ckpt / "latest").read_text())["tag"] == "step-00000004"
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


def zero2_state(folder: Path) -> dict:
    """A ZeRO-1/2 checkpoint's fp32 weights and AdamW moments per parameter, whole: each parameter group's
    rank partitions concatenated in rank order and cut at the parameter shapes the checkpoint lists."""
    model = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"]
             for f in sorted(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                             key=lambda f: int(f.name.split("_")[3]))]
    assert len(parts) == model["dp_world_size"]
    params = {}
    for g, shapes in enumerate(model["param_shapes"]):
        whole = {"fp32": torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])}
        for key in ("exp_avg", "exp_avg_sq"):
            whole[key] = torch.cat([p["base_optimizer_state"]["state"][g][key] for p in parts])
        offset = 0
        for name, shape in shapes.items():
            params[name] = {k: v[offset: offset + shape.numel()].view(shape) for k, v in whole.items()}
            offset += shape.numel()
        assert offset <= whole["fp32"].numel()
    steps = [int(parts[0]["base_optimizer_state"]["state"][g]["step"]) for g in range(len(model["param_shapes"]))]
    return {"params": params, "loader": model["loader"], "world_size": model["dp_world_size"], "adam_steps": steps}


def test_resume_at_a_different_world_size(shards, tmp_path):
    """2 ranks stop at step 3, 1 rank resumes through DeepSpeed's universal conversion and finishes."""
    run, dump = tmp_path / "ws", tmp_path / "state"
    args = common(shards, run, "train.max_steps=9", "checkpoint.every_steps=3", "checkpoint.keep=3",
                  f"checkpoint.dir={run / 'ckpt'}", "train.log_sample_keys=true",
                  "data.num_workers=1")  # one stream per rank: an epoch is then a whole number of steps
    train(2, *args, "train.stop_at_step=3", env={"STATE_DUMP": str(dump)}, script=STATE_TRAIN)
    proc = train(1, *args, "resume=auto", env={"STATE_DUMP": str(dump)}, script=STATE_TRAIN)
    assert "universal conversion from world size 2" in proc.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 10)) and all(np.isfinite(r["loss"]) for r in rows)

    # The state the single rank holds after the conversion is the state the two ranks committed: every
    # parameter's fp32 master weight and both AdamW moments, bit for bit, and Adam's step count. Both sides
    # are read from DeepSpeed's own files (the committed step-3 of two ranks; the single rank's save right
    # after loading) and reassembled here from their ZeRO-2 partitions.
    committed, loaded = zero2_state(run / "ckpt" / "step-00000003"), zero2_state(dump / "loaded-step-3")
    assert (committed["world_size"], loaded["world_size"]) == (2, 1)
    assert committed["params"].keys() == loaded["params"].keys() and len(committed["params"]) > 20
    for name, state in committed["params"].items():
        for what in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded["params"][name][what], state[what]), (name, what)
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in committed["params"].values())  # 3 steps of moments
    assert committed["adam_steps"] == loaded["adam_steps"] == [3, 3]
    # The loader's position: 3 steps x 4 samples x 2 ranks = 24 samples, the whole shard set once. The single
    # rank goes on at the start of the next epoch, and its 6 steps x 4 read that epoch whole, each sample once.
    everything = sorted(pd.read_parquet(shards / "index.parquet")["key"])
    assert len(everything) == 24
    first = [key for rank in (0, 1) for k in read_key_log(str(run), rank) if k["step"] <= 3 for key in k["keys"]]
    second = [key for k in read_key_log(str(run), 0) if k["step"] > 3 for key in k["keys"]]
    assert sorted(first) == everything and sorted(second) == everything
    assert "continuing at epoch 1, 0.0% through (24 samples consumed by all ranks)" in proc.stdout + proc.stderr
    assert committed["loader"]["samples_consumed"] == loaded["loader"]["samples_consumed"] == 3 * 4 * 2

    # the run keeps the rate it started with (base_lr 0.032 x 8 / 256 at 2 ranks), not 1 rank's half of it:
    # after 2 warm-up steps a cosine from 1e-3 to 0 over steps 2..9
    assert "keeping the run's peak lr 0.001 from its checkpoint (lr 0.0005 = base_lr 0.032" in proc.stdout
    expected = [1e-3] * 2 + [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 7)) for s in range(3, 10)]
    np.testing.assert_allclose([r["lr"] for r in rows], expected, rtol=1e-9, atol=1e-15)


def test_corrupt_shard_is_skipped_and_ranks_stay_in_step(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    m = json.loads((data / "manifest.json").read_text())
    victim = data / m["shards"][1]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated mid-sample
    run = tmp_path / "run"
    proc = train(2, f"data.manifest={data / 'manifest.json'}", f"run.dir={run}", "train.log_every=1",
                     "train.max_steps=12", "data.num_workers=1")
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    # every skip any rank's worker reported, summed over the ranks: one warning line per skip event
    events = (proc.stdout + proc.stderr).count("skipping shard")
    assert rows[-1]["skipped_shards"] == events >= 1 and rows[-1]["skipped_samples"] >= events
    assert proc.stdout.count("finished 12 steps") == 2  # both ranks ran every step


def test_bad_config_fails_before_launching_work(shards, tmp_path):
    proc = train(1, f"data.manifest={shards / 'manifest.json'}", "train.max_stepz=3", check=False)
    assert proc.returncode != 0 and "train.max_stepz" in proc.stderr + proc.stdout
    proc = train(1, f"data.manifest={shards / 'manifest.json'}", "model.s2_channels=12", f"run.dir={tmp_path}",
                     check=False)
    assert proc.returncode != 0 and "model.s2_channels=12" in proc.stderr + proc.stdout
    assert "hold 13 S2 bands" in proc.stderr + proc.stdout and "leave model.s2_channels unset" in proc.stderr + proc.stdout


def test_torchrun_launch(shards, tmp_path):
    """The same script under torchrun (RANK / WORLD_SIZE / LOCAL_RANK from the launcher, no --local_rank)."""
    run = tmp_path / "torchrun"
    proc = torchrun(2, "launch/train.py", "--config", DEBUG,
                    *common(shards, run, "train.max_steps=3", "train.log_sample_keys=true"))
    log = proc.stdout + proc.stderr
    assert log.count("finished 3 steps") == 2
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    # one 2-rank group, not two 1-rank runs: the batch counts both ranks, and at every step the ranks read
    # different samples of the shard set
    assert "global batch 8 (4 x 1 accumulation x 2 ranks)" in proc.stdout
    logs = [read_key_log(str(run), rank) for rank in (0, 1)]
    assert [[k["step"] for k in log] for log in logs] == [[1, 2, 3]] * 2
    for mine, theirs in zip(*logs):
        assert len(mine["keys"]) == len(theirs["keys"]) == 4 and not set(mine["keys"]) & set(theirs["keys"])


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``folder``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {folder}"
    scalars: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def test_zero1_accumulation_offload_tensorboard_and_resume_from_a_step_url(shards, tmp_path):
    """ZeRO-1 with 2 micro batches accumulated per step and the optimizer offloaded to host memory, DeepSpeed's
    TensorBoard monitor on; then a second run that starts from one step folder of the first (resume=<url>)."""
    a, b = tmp_path / "a", tmp_path / "b"
    setup = ["deepspeed.zero_stage=1", "train.micro_batch_size=2", "train.grad_accum_steps=2",
             "deepspeed.offload_optimizer=true", "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=2",
             "train.log_sample_keys=true", "data.num_workers=1", "train.log_every=1"]
    first = train(2, f"data.manifest={shards / 'manifest.json'}", f"run.dir={a}", f"checkpoint.dir={a / 'ckpt'}",
                  "deepspeed.monitor=tensorboard", *setup)
    # global batch = micro batch x accumulation x ranks = 2 x 2 x 2: the same lr as 4 x 1 x 2 (MAE's rule, base/256)
    assert "peak lr 0.001 = base_lr 0.032 x global batch 8 (2 x 2 accumulation x 2 ranks) / 256" in first.stdout
    rows = metrics(a)
    assert [r["step"] for r in rows] == list(range(1, 7))
    # One optimizer step per 2 micro batches: each rank reads 2 x 2 samples per step, and with 24 samples and 8 per
    # step, steps 1-3 and 4-6 are each one epoch, every sample of the index exactly once per epoch.
    everything = sorted(pd.read_parquet(shards / "index.parquet")["key"])
    logs = {rank: read_key_log(str(a), rank) for rank in (0, 1)}
    assert all(len(k["keys"]) == 4 for rank in (0, 1) for k in logs[rank])
    for epoch in ((1, 2, 3), (4, 5, 6)):
        seen = [key for rank in (0, 1) for k in logs[rank] if k["step"] in epoch for key in k["keys"]]
        assert sorted(seen) == everything, epoch
    # the checkpoint is ZeRO stage 1 with its optimizer offloaded to the CPU, 2 ranks' partitions, 6 Adam steps
    # (not 12: the accumulation boundary steps the optimizer)
    step6 = a / "ckpt" / "step-00000006"
    saved = torch.load(step6 / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["ds_config"]["zero_optimization"]["stage"] == 1
    assert saved["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert saved["ds_config"]["gradient_accumulation_steps"] == 2
    state = zero2_state(step6)
    assert state["world_size"] == 2 and set(state["adam_steps"]) == {6}
    assert all(p["exp_avg_sq"].abs().sum() > 0 for p in state["params"].values())

    # DeepSpeed's TensorBoard monitor holds the scalars metrics.jsonl holds, step for step (float32 in the events)
    scalars = tensorboard_scalars(a)
    for key in ("loss", "loss_s1", "loss_s2", "lr"):
        assert scalars[f"train/{key}"] == {r["step"]: pytest.approx(float(np.float32(r[key])), rel=1e-7)
                                           for r in rows}, key

    # A new run from the first run's step-3 folder, into its own checkpoint folder: it continues at step 4 and
    # repeats the first run's steps 4-6 exactly (losses bit for bit, the same samples on each rank).
    url = str(a / "ckpt" / "step-00000003")
    second = train(2, f"data.manifest={shards / 'manifest.json'}", f"run.dir={b}", f"checkpoint.dir={b / 'ckpt'}",
                   f"resume={url}", *setup)
    assert f"resumed from {a / 'ckpt'}/step-00000003 at step 3" in second.stdout
    resumed = metrics(b)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for key in ("loss", "loss_s1", "loss_s2", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in rows[3:]], key
    for rank in (0, 1):
        assert [k for k in read_key_log(str(b), rank) if k["step"] > 3] == logs[rank][3:]
    # the source folder is only read: its checkpoints are as they were, the new run's go to its own folder
    assert json.loads((a / "ckpt" / "latest").read_text())["tag"] == "step-00000006"
    assert json.loads((b / "ckpt" / "latest").read_text())["tag"] == "step-00000006"

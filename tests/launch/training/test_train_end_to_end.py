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
    # the same scalars reach DeepSpeed's own monitor
    csv_files = {p.name: p for p in run.rglob("*.csv")}
    assert any("loss" in name for name in csv_files), sorted(csv_files)
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
    proc = torchrun(2, "launch/train.py", "--config", DEBUG, *common(shards, run, "train.max_steps=3"))
    log = proc.stdout + proc.stderr
    assert log.count("finished 3 steps") == 2
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]

"""Hub-format exports from a real pretraining run: the folder training writes at its end, and
`python -m launch.export` for the committed checkpoint (`latest`) and an older step folder, to a local
folder and to S3; loaded back with `FusMAEEncoder.from_pretrained`, evaluated with `eval.pretrained`, and
re-exported with those results on the card.

One pretraining run (`deepspeed`, 2 CPU ranks, ZeRO-3: the partitions are consolidated by DeepSpeed's own
zero_to_fp32) on BigEarthNet-layout shards made by the real pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DEBUG, S3_ENV, bigearthnet_shards, deepspeed, fresh_s3fs, run_module
from launch.config import load_eval_config
from launch.data.augment import DeviceAugment
from launch.evaluation import MemoryCache, evaluate
from model import FusMAE, FusMAEEncoder
from pipeline.manifest import load_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
DEBUG_LINEAR = str(Path(DEBUG).parent / "eval" / "debug_linear.yaml")


@pytest.fixture(scope="module")
def ben(tmp_path_factory) -> dict[str, str]:
    """BigEarthNet-layout shards: 60 patches of 48 px, 20 per split, written by the real pipeline."""
    shards = bigearthnet_shards(tmp_path_factory.mktemp("ben_export"), n_patches=60, seed=7)
    return {"train": str(shards / "train" / "manifest.json"), "val": str(shards / "validation" / "manifest.json"),
            "test": str(shards / "test" / "manifest.json")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ben) -> Path:
    """configs/debug.yaml for 4 steps, ZeRO-3, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("pretrain_export")
    deepspeed(2, "launch/train.py", "--config", DEBUG, f"data.manifest={ben['train']}", "model.s2_channels=12",
              "data.image_size=32", "data.num_workers=1", "train.max_steps=4", "train.log_every=2",
              "checkpoint.every_steps=2", "checkpoint.keep=2", "deepspeed.zero_stage=3",
              f"checkpoint.dir={run / 'ckpt'}", f"run.dir={run}")
    return run / "ckpt"


def raw_batch(manifest_url: str, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw-valued inputs (dB, reflectance x 10000) around the shards' statistics."""
    stats = load_manifest(manifest_url).stats
    g = torch.Generator().manual_seed(0)

    def draw(m: str) -> torch.Tensor:
        mean, std = torch.tensor(stats[m]["mean"]), torch.tensor(stats[m]["std"])
        return mean.view(1, -1, 1, 1) + std.view(1, -1, 1, 1) * torch.randn(n, len(mean), 32, 32, generator=g)

    return draw("s1"), draw("s2").round().clamp_min(1).to(torch.int16)


def checkpoint_encoder(folder: Path, tag: str) -> FusMAE:
    """The encoder of a ZeRO checkpoint straight from DeepSpeed's zero_to_fp32 and the checkpoint's config."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from launch.evaluation.pretrained import client_state
    from model import FusMAEConfig

    cfg = FusMAEConfig(**client_state(str(folder), tag)["config"]["model"])
    net = FusMAE(cfg).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    net.load_encoder_state_dict({k: v for k, v in state.items() if not k.startswith("decoder")})
    return net


def test_training_writes_a_hub_folder_and_the_command_exports_any_step(ben, ckpt, tmp_path):
    trained = ckpt / "encoder"
    assert sorted(p.name for p in trained.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((trained / "config.json").read_text())
    manifest = load_manifest(ben["train"])
    assert config["training"]["step"] == 4 and config["training"]["tag"] == "step-00000004"
    assert config["training"]["zero_stage"] == 3 and config["data"]["shards"]["fingerprint"] == manifest.fingerprint
    assert config["data"]["s2_bands"] == manifest.bands("s2") and config["model"]["s2_channels"] == 12

    run_module("launch.export", str(ckpt), str(tmp_path / "latest"))
    run_module("launch.export", str(ckpt / "step-00000002"), str(tmp_path / "step2"))
    s1, s2 = raw_batch(ben["train"])
    augment = DeviceAugment.for_manifest(manifest, 32)
    n1, n2, _ = augment({"s1": s1, "s2": s2}, "cpu")  # pretraining's normalisation (no crop: a plain pass)
    for folder, tag in ((tmp_path / "latest", "step-00000004"), (tmp_path / "step2", "step-00000002")):
        enc = FusMAEEncoder.from_pretrained(str(folder))
        assert enc.config["training"] == {"step": int(tag[-1]), "checkpoint": str(ckpt), "tag": tag, "zero_stage": 3}
        net = checkpoint_encoder(ckpt, tag)
        with torch.no_grad():
            want = net.encode(n1, n2)
            # the checkpoint's own fp32 weights, the same ops: equal, from raw and from normalised inputs
            assert torch.equal(enc(n1, n2, normalized=True).pooled, want)
            assert torch.equal(enc(s1, s2).pooled, want)
            maps = enc(s1, s2, return_maps=True).maps
        assert len(maps) == 3 and all(m.shape == (4, 64, 4, 4) for m in maps)
    # the folder written at the end of training holds the same weights: gathered from the ZeRO-3 module
    # rather than zero_to_fp32's consolidated fp32 master copy, equal up to float32 rounding (fp32 training)
    a, b = FusMAEEncoder.from_pretrained(str(trained)), FusMAEEncoder.from_pretrained(str(tmp_path / "latest"))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-6, atol=1e-6)
    step2 = FusMAEEncoder.from_pretrained(str(tmp_path / "step2"))
    assert not torch.equal(step2.blocks[1].mlp.fc1.weight, b.blocks[1].mlp.fc1.weight)  # another step's weights


def test_evaluated_export_gets_its_results_on_the_card_and_goes_to_s3(ben, ckpt, tmp_path, s3_bucket):
    exported = ckpt / "encoder"
    cfg = load_eval_config(DEBUG_LINEAR, [f"data.train_manifest={ben['train']}", f"data.val_manifest={ben['val']}",
                                          f"data.test_manifest={ben['test']}", f"eval.pretrained={exported}",
                                          f"run.dir={tmp_path / 'eval'}", "eval.epochs=3"])
    doc = evaluate(cfg, memory=MemoryCache())  # eval.pretrained takes the Hub folder
    assert doc["settings"]["pretrained_info"]["kind"] == "export" and doc["settings"]["pretrained_info"]["step"] == 4
    results = tmp_path / "eval" / "results.json"

    dest = f"{s3_bucket}/models/fusmae-tiny"
    proc = run_module("launch.export", str(exported), dest, "--results", str(results), env=S3_ENV)
    assert f"exported encoder to {dest}" in proc.stdout
    fs = fresh_s3fs()
    card = fs.cat_file(f"{dest}/README.md").decode()
    assert f"| linear | 1.0 | `{ben['test']}` | 20 | {doc['map_macro']:.4g} |" in card
    for band in load_manifest(ben["train"]).bands("s2"):
        assert f"| {band} |" in card
    fs.get(dest, str(tmp_path / "hub"), recursive=True)
    enc = FusMAEEncoder.from_pretrained(str(tmp_path / "hub"))
    assert enc.config["evaluation"][0]["map_macro"] == doc["map_macro"]
    assert enc.config["training"]["checkpoint"] == str(ckpt)  # from the export it converted, not the copy
    # results of other weights are refused
    proc = run_module("launch.export", str(ckpt / "step-00000002"), str(tmp_path / "other"), "--results",
                      str(results), check=False)
    assert proc.returncode == 2 and "results are of other weights" in proc.stderr

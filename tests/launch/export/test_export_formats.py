"""The export formats without a training run: the Hub folder (local and S3), the older pair still loading,
the card's results, the shards through plain webdataset, `python -m launch.export`'s errors, the TerraTorch
recipe's shape. The end-to-end runs from real checkpoints are in test_export_end_to_end.py."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from conftest import ROOT, S3_ENV, fresh_s3fs, run_module
from launch.data.loader import LoaderSettings, PassLoader
from launch.evaluation.pretrained import locate_pretrained, weights_digest
from launch.terratorch import BACKBONES
from launch.terratorch.shard_dataset import shard_samples, to_example
from launch.training import export
from model import FusMAE, FusMAEConfig, FusMAEEncoder
from pipeline.manifest import load_manifest
from shardfactory import make_shard_set

CFG = FusMAEConfig.preset("tiny", img_size=16, patch_size=8, s2_channels=12)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shard_set(str(tmp_path_factory.mktemp("shards")), (3, 2), hw=16, s2_channels=12, labels=True)


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return FusMAE(CFG).encoder_state_dict()


def hub_export(shards: str, dest: str, seed: int = 0, **kw) -> tuple[dict, dict]:
    state = tiny_state(seed)
    config = export.hub_config(CFG, load_manifest(shards), 16, step=7, checkpoint="s3://u:p@bucket/ckpt", **kw)
    export.export_pretrained(state, config, dest)
    return state, config


def test_hub_folder_is_written_config_last_and_loads_everywhere(shards, tmp_path, monkeypatch):
    order: list[str] = []
    put, write = export.put_atomic, export.write_bytes_atomic
    monkeypatch.setattr(export, "put_atomic",
                        lambda fs, src, dst: (order.append(dst.rsplit("/", 1)[1]), put(fs, src, dst)))
    monkeypatch.setattr(export, "write_bytes_atomic",
                        lambda fs, dst, data: (order.append(dst.rsplit("/", 1)[1]), write(fs, dst, data)))
    dest = tmp_path / "encoder"
    state, config = hub_export(shards, str(dest))
    assert order == ["model.safetensors", "README.md", "config.json"]  # each once, the config last
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    written = json.loads((dest / "config.json").read_text())
    manifest = load_manifest(shards)
    assert written["data"]["s2_bands"] == manifest.bands("s2") and written["data"]["s1_bands"] == ["VV", "VH"]
    assert written["data"]["normalization"]["s2"]["mean"] == manifest.stats["s2"]["mean"]
    assert written["data"]["shards"]["fingerprint"] == manifest.fingerprint
    assert written["training"] == {"step": 7, "checkpoint": "s3://***@bucket/ckpt", "tag": None, "zero_stage": None}
    assert written["model"]["fusion"] == "xattn" and written["model"]["patch_size"] == 8

    enc = FusMAEEncoder.from_pretrained(str(dest))
    assert all(torch.equal(enc.state_dict()[k], state[k]) for k in state)
    # eval.pretrained takes the folder and its weights file
    assert locate_pretrained(str(dest)) == locate_pretrained(str(dest / "model.safetensors")) == "export"
    for url in (str(dest), str(dest / "model.safetensors")):
        net, meta = export.load_encoder(url)
        assert meta["format"] == "hub" and meta["step"] == 7 and meta["manifest"] == manifest.shown
        assert all(torch.equal(net.encoder_state_dict()[k], state[k]) for k in state)


def test_older_export_still_loads(tmp_path):
    state = tiny_state(1)
    export.export_encoder(state, CFG, {"manifest": "shards/manifest.json", "image_size": 16}, str(tmp_path / "old"),
                          extra={"step": 3})
    for url in (str(tmp_path / "old"), str(tmp_path / "old" / "encoder.safetensors")):
        assert locate_pretrained(url) == "export"
        net, meta = export.load_encoder(url)
        assert meta["format"] == "legacy" and meta["step"] == 3 and meta["manifest"] == "shards/manifest.json"
        assert all(torch.equal(net.encoder_state_dict()[k], state[k]) for k in state)


def test_hub_folder_on_s3(shards, s3_bucket, tmp_path):
    dest = f"{s3_bucket}/models/tiny"
    state, _ = hub_export(shards, dest, seed=2)
    fs = fresh_s3fs()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(dest)) == ["README.md", "config.json", "model.safetensors"]
    net, meta = export.load_encoder(dest)
    assert meta["format"] == "hub" and all(torch.equal(net.encoder_state_dict()[k], state[k]) for k in state)
    fs.get(dest, str(tmp_path / "local"), recursive=True)
    assert torch.equal(FusMAEEncoder.from_pretrained(str(tmp_path / "local")).norm.weight, state["norm.weight"])


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_hub_folder_at_file_and_memory_urls(shards, tmp_path, scheme):
    # file:// is the plain folder (nothing created under a folder literally named "file:"); memory:// is one
    # process's filesystem, which the evaluation and export commands can use in-process
    import fsspec

    dest = (tmp_path / "enc").as_uri() if scheme == "file" else f"memory://{uuid.uuid4().hex}/enc"
    state, _ = hub_export(shards, dest, seed=3)
    fs, root = fsspec.core.url_to_fs(dest)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)) == [
        "README.md", "config.json", "model.safetensors"]
    if scheme == "file":
        assert (tmp_path / "enc" / "config.json").is_file() and not (ROOT / "file:").exists()
    net, meta = export.load_encoder(dest)
    assert meta["format"] == "hub" and meta["step"] == 7
    assert all(torch.equal(net.encoder_state_dict()[k], state[k]) for k in state)


def test_evaluation_results_must_be_of_these_weights():
    state = tiny_state()
    digest = weights_digest(state)
    doc = {"map_macro": 0.5, "map_micro": 0.6, "f1": 0.4, "f1_macro": 0.3, "num_test_samples": 20,
           "settings": {"protocol": "linear", "label_fraction": 0.1, "seed": 0,
                        "pretrained_info": {"weights_sha256": digest},
                        "config": {"data": {"test_manifest": "s3://k:s@b/test/manifest.json"}}}}
    line = export.evaluation_summary(doc, digest, "results.json")
    assert line == {"protocol": "linear", "label_fraction": 0.1, "seed": 0,
                    "test_manifest": "s3://***@b/test/manifest.json", "map_macro": 0.5, "map_micro": 0.6, "f1": 0.4,
                    "f1_macro": 0.3, "num_test_samples": 20}
    with pytest.raises(ValueError, match="results are of other weights"):
        export.evaluation_summary(doc, weights_digest(tiny_state(1)), "results.json")
    with pytest.raises(ValueError, match="not a results.json written by launch.eval"):
        export.evaluation_summary({"loss": 1}, digest, "results.json")


# -- the shards through plain webdataset ------------------------------------------------------------


def loader_samples(manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for batch in PassLoader(manifest, LoaderSettings(num_workers=0), batch_size=2):
        for i, key in enumerate(batch["keys"]):
            out[key] = (batch["s1"][i].numpy(), batch["s2"][i].numpy())
    return out


@pytest.mark.parametrize("dtypes", [("float32", "int16"), ("float16", "uint16")])
def test_plain_webdataset_reads_the_arrays_the_project_loader_reads(tmp_path, dtypes):
    url = make_shard_set(str(tmp_path), (3, 1, 2), hw=8, s2_channels=4, s1_dtype=dtypes[0], s2_dtype=dtypes[1])
    manifest = load_manifest(url)
    want = loader_samples(manifest)
    plain = list(wds.WebDataset([s.url for s in manifest.shards], shardshuffle=False).decode())
    ours = list(shard_samples(manifest))
    assert [s["__key__"] for s in plain] == [s["__key__"] for s in ours] == list(want) and len(want) == 6
    for a, b in zip(plain, ours):
        s1, s2 = want[a["__key__"]]
        for s in (a, b):
            assert s["s1.npy"].dtype == np.dtype(dtypes[0]) and s["s2.npy"].dtype == np.dtype(dtypes[1])
            np.testing.assert_array_equal(s["s1.npy"], s1)  # the loader widens uint16 to int32; values equal
            np.testing.assert_array_equal(s["s2.npy"], s2)
            assert s["json"]["s2_bands"] == manifest.bands("s2")


def test_webdataset_pipeline_reads_object_storage_and_shuffles_by_seed(tmp_path, s3_bucket):
    local = load_manifest(make_shard_set(str(tmp_path), (3, 2, 3), hw=8, s2_channels=4, labels=True, seed=4))
    remote = load_manifest(make_shard_set(f"{s3_bucket}/shards", (3, 2, 3), hw=8, s2_channels=4, labels=True, seed=4))
    a, b = list(shard_samples(local)), list(shard_samples(remote))
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
    assert all(np.array_equal(x["s2.npy"], y["s2.npy"]) for x, y in zip(a, b))
    one, again = ([s["__key__"] for s in shard_samples(local, shuffle=4, seed=1)] for _ in range(2))
    assert sorted(one) == sorted(s["__key__"] for s in a) and one == again  # a permutation, fixed by the seed
    ex = to_example({**a[0], "json": {"label_vector": [0, 1, 1]}})
    assert ex["image"]["s2"].dtype == torch.float32 and ex["image"]["s1"].shape == (2, 8, 8)
    assert ex["label"].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(KeyError, match="no `label_vector`"):
        to_example(a[0])


# -- python -m launch.export ------------------------------------------------------------------------


def test_cli_converts_an_older_export(shards, tmp_path):
    state = tiny_state(5)
    export.export_encoder(state, CFG, {}, str(tmp_path / "old"), extra={"step": 9})
    proc = run_module("launch.export", str(tmp_path / "old"), str(tmp_path / "new"), "--manifest", shards)
    assert "exported encoder to" in proc.stdout
    new = FusMAEEncoder.from_pretrained(str(tmp_path / "new"))
    assert new.config["training"]["step"] == 9 and all(torch.equal(new.state_dict()[k], state[k]) for k in state)
    # without the shard set the export cannot state bands and statistics: said so, exit 2
    proc = run_module("launch.export", str(tmp_path / "old"), str(tmp_path / "other"), check=False)
    assert proc.returncode == 2 and "pass --manifest" in proc.stderr


def test_cli_errors_are_clear_exit_2_and_print_no_credentials(shards, tmp_path, s3_bucket):
    hub_export(shards, str(tmp_path / "enc"))
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"]
    options = json.dumps({"key": S3_ENV["AWS_ACCESS_KEY_ID"], "secret": "opt-s3cret-value"})
    cases = [
        ([str(tmp_path / "nowhere"), str(tmp_path / "out")], r"checkpoint=.*nowhere: not found"),
        ([f"{s3_bucket}/runs/nowhere", str(tmp_path / "out"), "--storage-options", options],
         r"checkpoint=s3://.*/runs/nowhere: not found"),
        ([str(tmp_path / "enc"), str(tmp_path / "enc")], r"already holds an exported encoder.*--overwrite"),
        ([str(tmp_path / "enc"), str(tmp_path / "enc" / "config.json" / "sub")], r"not writable"),
        ([str(tmp_path / "enc"), "s3://no-such-bucket-for-export/models/x", "--storage-options", options],
         r"not writable: s3://no-such-bucket-for-export"),
        ([str(tmp_path / "enc"), str(tmp_path / "out"), "--results", str(tmp_path / "missing.json")],
         r"results file not found"),
    ]
    for args, message in cases:
        proc = run_module("launch.export", *args, env=S3_ENV, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert re.search(message, proc.stderr), (message, proc.stderr)
        assert "Traceback" not in proc.stderr
        for text in (secret, "opt-s3cret-value"):
            assert text not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()
    # credentials inside a URL (which s3fs refuses, with a message quoting the URL) never reach the output
    proc = run_module("launch.export", "s3://AKIAFAKE:hunter2secret@bucket/ckpt", str(tmp_path / "out"),
                      env=S3_ENV, check=False)
    assert proc.returncode != 0 and "hunter2secret" not in proc.stdout + proc.stderr and "***@" in proc.stderr


# -- the TerraTorch recipe, without terratorch ---------------------------------------------------


def test_terratorch_recipes_name_this_projects_classes():
    recipes = sorted((ROOT / "configs" / "terratorch").glob("*.yaml"))
    assert recipes
    for path in recipes:
        raw = yaml.safe_load(path.read_text())
        assert raw["data"]["class_path"] == "launch.terratorch.datamodule.ShardDataModule"
        assert Path(ROOT / "launch" / "terratorch" / "datamodule.py").exists()
        args = raw["model"]["init_args"]
        assert args["model_factory"] == "EncoderDecoderFactory" and args["model_args"]["backbone"] in BACKBONES
        assert len(args.get("class_names", [])) in (0, args["model_args"].get("num_classes"))

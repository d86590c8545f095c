"""The config schema: every shipped YAML loads, overrides work, mistakes fail early and clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch.config import ConfigError, PretrainConfig, deepspeed_config, load_config, save_config
from model import FusMAE

ROOT = Path(__file__).resolve().parents[2]
# pretraining recipes; configs/eval/ has its own schema and its own test (tests/test_eval.py)
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
REQUIRED = ["data.manifest=memory://shards/manifest.json"]


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"debug.yaml", "vit_s.yaml", "vit_b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads_against_the_schema(path):
    cfg = load_config(str(path), REQUIRED)
    assert isinstance(cfg, PretrainConfig)
    # every key written in the file must have reached the config (no silently ignored keys)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in (values or {}).items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or list(got) == value, f"{path.name}: {section}.{key}"
    assert cfg.model.img_size == cfg.data.image_size


def test_presets_give_standard_vit_widths():
    vit_b = load_config(str(ROOT / "configs/vit_b.yaml"), REQUIRED).model
    assert (vit_b.embed_dim, vit_b.depth, vit_b.num_heads) == (768, 12, 12)
    vit_s = load_config(str(ROOT / "configs/vit_s.yaml"), REQUIRED).model
    assert (vit_s.embed_dim, vit_s.depth, vit_s.num_heads) == (384, 12, 6)


def test_overrides_take_precedence_and_are_typed():
    cfg = load_config(str(ROOT / "configs/debug.yaml"), REQUIRED + [
        "train.max_steps=7", "model.fusion=concat", "model.depth=2", "train.lr=0.01", "train.base_lr=null", "train.betas=[0.8,0.9]",
        "checkpoint.dir=s3://bucket/run", "resume=auto",
    ])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.fusion == "concat" and cfg.model.depth == 2
    assert cfg.train.lr == pytest.approx(0.01)
    assert list(cfg.train.betas) == [0.8, 0.9]
    assert cfg.resume == "auto"
    assert cfg.model.s2_channels is None  # left to the manifest
    cfg.model.s1_channels, cfg.model.s2_channels = 2, 12  # as derive_bands sets them from a manifest
    FusMAE(cfg.model)  # the merged model config builds a network


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.max_stepz=3"], r"train\.max_stepz"),
        (["modell.fusion=xattn"], r"modell"),
        (["train.max_steps=abc"], r"train\.max_steps"),
        (["train.bf16=maybe"], r"train\.bf16"),
        (["model.fusion=latefusion"], r"model\.fusion"),
        (["model.size=vit_xxl"], r"model\.size"),
        (["model.decoder=xattn", "model.fusion=stack"], r"model\.decoder"),
        (["data.image_size=30"], r"data\.image_size"),
        (["deepspeed.zero_stage=4"], r"deepspeed\.zero_stage"),
        (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], r"deepspeed\.offload_optimizer: .*stage 0"),
        (["train.micro_batch_size=0"], r"train\.micro_batch_size"),
        (["resume=auto"], r"checkpoint\.dir"),
        (["max_steps"], r"key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(str(ROOT / "configs/debug.yaml"), REQUIRED + overrides)


def test_missing_required_setting_is_named():
    with pytest.raises(ConfigError, match=r"data\.manifest"):
        load_config(str(ROOT / "configs/debug.yaml"), [])


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 5\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.warmup"):
        load_config(str(bad), REQUIRED)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"), REQUIRED)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken), REQUIRED)


def test_deepspeed_json_is_derived_from_the_schema():
    cfg = load_config(str(ROOT / "configs/vit_b.yaml"), REQUIRED + ["deepspeed.zero_stage=3", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=16, has_gpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 * 4 * 16
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    # the optimizer and learning rate are set in one place only: the trainer builds them from train.*
    assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("has_gpu,torch_adam,client_optimizer", [
    (False, None, True), (True, None, False), (True, True, True), (False, False, False)])
def test_offload_takes_the_optimizer_it_runs_with(has_gpu, torch_adam, client_optimizer):
    # DeepSpeed refuses ZeRO-Offload with a client optimizer unless zero_force_ds_cpu_optimizer is false: set
    # exactly when the trainer hands it torch's AdamW (torch_adam, automatic: without a GPU)
    extra = [] if torch_adam is None else [f"deepspeed.torch_adam={str(torch_adam).lower()}"]
    cfg = load_config(str(ROOT / "configs/debug.yaml"), REQUIRED + ["deepspeed.offload_optimizer=true", *extra])
    ds = deepspeed_config(cfg, world_size=2, has_gpu=has_gpu)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": has_gpu}
    assert cfg.deepspeed.uses_torch_adam(has_gpu) is client_optimizer
    assert ds.get("zero_force_ds_cpu_optimizer", True) is not client_optimizer


def test_saved_config_has_no_credentials(tmp_path):
    # credentials belong in the YAML (or the environment), never on the command line
    recipe = tmp_path / "recipe.yaml"
    body = yaml.safe_load((ROOT / "configs/debug.yaml").read_text())
    body.setdefault("checkpoint", {})["storage_options"] = {
        "key": "AKIAEXAMPLE", "secret": "verysecretvalue", "client_kwargs": {"region_name": "eu-west-1"}}
    recipe.write_text(yaml.safe_dump(body))
    cfg = load_config(str(recipe), REQUIRED)
    assert cfg.checkpoint.storage_options["secret"] == "verysecretvalue"  # used by the run...
    out = tmp_path / "config.yaml"
    save_config(cfg, str(out))
    text = out.read_text()
    for secret in ("AKIAEXAMPLE", "verysecretvalue"):  # ...and never written
        assert secret not in text
    assert "eu-west-1" in text  # non-secret options survive
    reloaded = load_config(str(out), [])
    assert reloaded.train == cfg.train and reloaded.model == cfg.model


# -- misuse that must fail before anything starts -----------------------------------------------------------


@pytest.mark.parametrize("override", [
    "checkpoint.storage_options={key: AKIDEXAMPLE, secret: cli-secret-zz}",
    "data.storage_options={aws_secret_access_key: cli-secret-zz}",
])
def test_credentials_on_the_command_line_are_refused(override):
    with pytest.raises(ConfigError, match="credentials are not accepted on the command line") as err:
        load_config(str(ROOT / "configs/debug.yaml"), REQUIRED + [override])
    assert "cli-secret-zz" not in str(err.value) and "AKIDEXAMPLE" not in str(err.value)
    assert "environment" in str(err.value) and "YAML" in str(err.value)


def test_credentials_inside_urls_are_refused_and_not_shown(tmp_path):
    with pytest.raises(ConfigError, match="data.manifest=\\*\\*\\*: credentials are not accepted") as err:
        load_config(str(ROOT / "configs/debug.yaml"), ["data.manifest=s3://AKIDEXAMPLE:url-secret-zz@b/m.json"])
    assert "url-secret-zz" not in str(err.value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  manifest: s3://b/m.json\ncheckpoint:\n  dir: s3://AKIDEXAMPLE:url-secret-zz@b/ck\n")
    with pytest.raises(ConfigError, match=r"checkpoint.dir=s3://\*\*\*@b/ck: credentials inside a URL") as err:
        load_config(str(recipe))
    assert "url-secret-zz" not in str(err.value)


@pytest.mark.parametrize("value", ["autoo", "latest", "step-00000004"])
def test_resume_must_be_none_auto_or_a_url(value):
    with pytest.raises(ConfigError, match=f"resume: '{value}' is neither none, auto nor a checkpoint URL"):
        load_config(str(ROOT / "configs/debug.yaml"), REQUIRED + [f"resume={value}", "checkpoint.dir=/tmp/ck"])
    cfg = load_config(str(ROOT / "configs/debug.yaml"), REQUIRED + ["resume=s3://bucket/run/step-00000004"])
    assert cfg.resume == "s3://bucket/run/step-00000004"

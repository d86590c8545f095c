"""The encoder to evaluate: located and loaded from whatever ``eval.pretrained`` names.

- a training checkpoint folder with ``latest`` (`launch.training.checkpoint.find_latest`), or one
  of its ``step-N`` folders (`find_step` when remote): DeepSpeed's files of any ZeRO stage,
  downloaded with `fetch` when remote and consolidated by DeepSpeed's own ``zero_to_fp32``;
- an export (`launch.training.export.load_encoder`): a Hub-format folder (``model.safetensors`` +
  ``config.json``) or its weights file, or the older ``encoder.safetensors`` or its folder;
- ``none``: the random-initialisation baseline, built from ``model.*`` of the eval config.

The architecture comes with the weights (the client state's ``config.model``, or
the export's config), at this run's ``data.image_size`` and with its runtime switches;
before any weights are read its bands are matched by name with every split's (`bands.band_maps`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from launch.config import ConfigError, EvalConfig
from launch.data.fit import derive_bands
from launch.evaluation.bands import BandMap, band_maps
from launch.distributed import Runtime
from launch.training import checkpoint
from launch.training.export import HUB_WEIGHTS
from launch.training.export import WEIGHTS as EXPORT_WEIGHTS
from launch.training.export import load_encoder, read_export_meta
from model import FusMAE, FusMAEConfig
from pipeline.manifest import Manifest
from pipeline.storage import is_local, redact_url, url_to_fs

log = logging.getLogger("launch.evaluation.pretrained")

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
"""DeepSpeed's file with the module and the client state: ZeRO 0-2, ZeRO 3."""
RUNTIME_FIELDS = ("fused_attn", "grad_checkpointing")
"""FusMAEConfig fields that change how the network runs, not its weights: taken from the eval config."""
HINT = ("expected a training checkpoint folder (with `latest`), one of its step-N folders, or an "
        "exported encoder (a folder with model.safetensors + config.json, or an older encoder.safetensors), "
        "or `none`")


@dataclass
class Pretrained:
    """An encoder ready for evaluation (decoder removed) and where it came from."""

    net: FusMAE
    kind: str
    """zero-checkpoint, export or none."""
    source: str
    """eval.pretrained, credentials redacted."""
    digest: str
    """sha256 of the encoder weights (names and float32 values): what feature caches are keyed by."""
    bands: dict[str, BandMap] = dataclasses.field(default_factory=dict)
    """How the downstream bands reach the encoder, per modality it uses (`bands.band_maps`)."""
    tag: Optional[str] = None
    step: Optional[int] = None
    zero_stage: Optional[int] = None

    @property
    def cfg(self) -> FusMAEConfig:
        return self.net.cfg

    def describe(self) -> dict[str, Any]:
        return {"pretrained": self.source, "kind": self.kind, "tag": self.tag, "step": self.step,
                "zero_stage": self.zero_stage, "weights_sha256": self.digest}


def encoder_only(net: FusMAE) -> FusMAE:
    """Drop the decoder (every top-level ``decoder*`` module): evaluation never runs it, and DDP must
    not see parameters without gradients."""
    for name, _ in list(net.named_children()):
        if name.startswith("decoder"):
            setattr(net, name, None)
    return net


def weights_digest(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- what eval.pretrained names ---------------------------------------------------------------


def locate_pretrained(url: str, storage_options: Optional[dict[str, Any]] = None,
                      label: str = "eval.pretrained") -> str:
    """What ``eval.pretrained`` (or ``label``, in the errors) names: checkpoint-dir (with ``latest``),
    checkpoint-step (a ``step-N`` folder or a folder of DeepSpeed files) or export (a ``*.safetensors``
    file, or a folder with ``model.safetensors`` or ``encoder.safetensors``)."""
    shown = redact_url(url)
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise ConfigError(f"{label}={shown}: not found ({HINT})")
    if path.endswith(".safetensors"):
        return "export"
    if fs.exists(f"{path}/{checkpoint.LATEST}"):
        return "checkpoint-dir"
    if path.rsplit("/", 1)[-1].startswith(checkpoint.STEP_PREFIX) or any(fs.exists(f"{path}/{f}") for f in MODEL_STATES):
        return "checkpoint-step"
    if fs.exists(f"{path}/{HUB_WEIGHTS}") or fs.exists(f"{path}/{EXPORT_WEIGHTS}"):
        return "export"
    raise ConfigError(f"{label}={shown}: holds neither a checkpoint nor an exported encoder ({HINT})")


def read_model_config(d: dict[str, Any], source: str) -> dict[str, Any]:
    """FusMAEConfig fields from a checkpoint's config, unknown (older / newer) fields dropped with a warning."""
    known = {f.name for f in dataclasses.fields(FusMAEConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        log.warning("%s: ignoring model config field(s) this version does not know: %s", source, unknown)
    return {k: v for k, v in d.items() if k in known}


def build_model_config(fields_: dict[str, Any], cfg: EvalConfig, source: str) -> FusMAEConfig:
    """The checkpoint's architecture at ``data.image_size``, with this run's runtime switches."""
    patch = int(fields_.get("patch_size", FusMAEConfig.patch_size))
    if cfg.data.image_size % patch:
        near = patch * max(1, round(cfg.data.image_size / patch))
        raise ConfigError(f"data.image_size={cfg.data.image_size} is not divisible by model.patch_size={patch} "
                          f"of {source}; choose a multiple of {patch} (e.g. {near})")
    merged = {**fields_, "img_size": cfg.data.image_size, **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS}}
    if cfg.eval.pool != "checkpoint":  # the probe's choice of pooled feature (mean of the tokens, or CLS)
        merged["pool"] = cfg.eval.pool
    try:
        return FusMAEConfig(**merged)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: its model config does not build a network: {err}") from err


def check_fits_every_split(model_cfg: FusMAEConfig, manifests: dict[str, Manifest],
                           source: str) -> dict[str, BandMap]:
    """How every split's bands reach the encoder, matched by name (`bands.band_maps`); a ConfigError when
    they share too little. No ``image_size`` check: evaluation resizes (120 → 128 px)."""
    return band_maps(model_cfg, manifests, source)


def _load_state(state_dict: dict[str, Tensor], net: FusMAE, source: str) -> None:
    """Load the encoder part of a (full-model or encoder) state dict, strictly."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    state = {k: v for k, v in state.items() if not k.startswith("decoder")}
    try:
        net.load_encoder_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{source}: the weights do not fit the network of its own config ({err})") from err


# -- DeepSpeed training checkpoints -------------------------------------------------------------


@contextlib.contextmanager
def checkpoint_folder(url: str, kind: str, staging: str, storage_options: dict[str, Any],
                      label: str = "eval.pretrained") -> Iterator[tuple[str, str]]:
    """(a local folder holding ``<tag>/`` with DeepSpeed's files, the tag) for a checkpoint folder's
    ``latest`` or one step folder. Local checkpoints are read in place; remote ones are downloaded
    (checksums checked) only once every rank's record of the step is there."""
    shown = redact_url(url.rstrip("/"))
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    if kind == "checkpoint-dir":
        try:
            found = checkpoint.find_latest(url, storage_options)
        except (RuntimeError, ValueError, KeyError) as err:  # incomplete step, or not our `latest` pointer
            raise ConfigError(f"{label}={shown}: not a usable training checkpoint folder "
                              f"({type(err).__name__}: {err})") from err
        if found is None:
            raise ConfigError(f"{label}={shown}: no committed checkpoint there")
        root, tag = path, found.tag
    else:  # one step folder: its parent holds <tag>/ as DeepSpeed expects
        root, _, tag = path.rpartition("/")
        found = None
        if not is_local(fs):  # a remote step must be complete (every rank's record) before downloading it
            try:
                found = checkpoint.find_step(url, storage_options)
            except FileNotFoundError as err:
                raise ConfigError(f"{label}={shown}: {err}") from err
    if is_local(fs):
        yield root, tag
        return
    os.makedirs(staging, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging, prefix="pretrained-") as tmp:
        print(f"downloading checkpoint {shown} ({tag})", flush=True)
        checkpoint.fetch(found, tmp, storage_options)
        yield tmp, tag


def client_state(folder: str, tag: str) -> dict[str, Any]:
    for name in MODEL_STATES:
        path = os.path.join(folder, tag, name)
        if os.path.exists(path):
            # The client state holds plain Python objects (config, loader state): not weights_only.
            return torch.load(path, map_location="cpu", weights_only=False)
    raise ConfigError(f"{folder}/{tag}: no DeepSpeed model states file ({' or '.join(MODEL_STATES)})")


def consolidate(folder: str, tag: str, client: dict[str, Any]) -> tuple[dict[str, Tensor], int]:
    """fp32 weights of every ZeRO partition merged by DeepSpeed's zero_to_fp32 (the optimizer's fp32
    master copy). Stage 0 has no partitions: the module's own weights, in the training dtype."""
    stage = client.get("zero_stage")
    if stage is None:
        stage = int(client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if int(stage) == 0:
        return {k: v.float() for k, v in client["module"].items()}, 0
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # its progress prints stay out of the results on stdout
        state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)
    return {k: v.float() for k, v in state.items()}, int(stage)


# -- loading ------------------------------------------------------------------------------------


def load_pretrained(cfg: EvalConfig, manifests: dict[str, Manifest], rt: Runtime) -> Pretrained:
    """The encoder named by ``eval.pretrained`` (on rank 0 read from storage, then copied to every rank)."""
    e = cfg.eval
    if e.random_init:
        source = "model.* of the eval config (eval.pretrained=none)"
        model_cfg = build_model_config(dataclasses.asdict(cfg.model), cfg, source)
        derive_bands(model_cfg, manifests["train"], source)  # the baseline is built for the shards' bands
        maps = check_fits_every_split(model_cfg, manifests, source)
        torch.manual_seed(e.seed)  # the baseline's initialisation is part of the seeded run
        net = encoder_only(FusMAE(model_cfg))
        return Pretrained(net, "none", "none", weights_digest(net.encoder_state_dict()), maps)

    loaded: dict[str, Any] = {}

    def read() -> dict[str, Any]:
        kind = locate_pretrained(e.pretrained, e.storage_options)
        if kind == "export":
            return _read_export(cfg, manifests, loaded)
        return _read_checkpoint(cfg, manifests, kind, loaded)

    info = rt.on_main(read, expected=(ConfigError,))
    model_cfg = build_model_config(info["model"], cfg, info["source"])
    maps = check_fits_every_split(model_cfg, manifests, info["source"])
    if rt.is_main:
        for m in maps.values():
            print(f"bands: {m.summary()}", flush=True)
    net = encoder_only(FusMAE(model_cfg))
    if rt.is_main:
        _load_state(loaded["state"], net, info["source"])
    rt.sync_module(net.to(rt.device))  # on the device: NCCL broadcasts GPU tensors only
    digest = rt.broadcast(weights_digest(net.encoder_state_dict()) if rt.is_main else None)
    return Pretrained(net, info["kind"], redact_url(e.pretrained), digest, maps, info.get("tag"), info.get("step"),
                      info.get("zero_stage"))


def _read_export(cfg: EvalConfig, manifests: dict[str, Manifest], out: dict[str, Any]) -> dict[str, Any]:
    e = cfg.eval
    shown = redact_url(e.pretrained)
    try:
        meta = read_export_meta(e.pretrained, e.storage_options)  # either export format
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"eval.pretrained={shown}: {err}") from err
    fields_ = read_model_config(meta["model"], shown)
    check_fits_every_split(build_model_config(fields_, cfg, shown), manifests, shown)  # before reading the weights
    net, _ = load_encoder(e.pretrained, e.storage_options)
    out["state"] = net.encoder_state_dict()
    return {"kind": "export", "model": fields_, "source": shown, "step": meta.get("step")}


def _read_checkpoint(cfg: EvalConfig, manifests: dict[str, Manifest], kind: str,
                     out: dict[str, Any]) -> dict[str, Any]:
    e = cfg.eval
    staging = os.path.join(cfg.run.dir, "staging")
    with checkpoint_folder(e.pretrained, kind, staging, dict(e.storage_options)) as (folder, tag):
        shown = redact_url(e.pretrained.rstrip("/"))
        shown = shown if kind == "checkpoint-step" else f"{shown} ({tag})"
        client = client_state(folder, tag)
        model = (client.get("config") or {}).get("model")
        if not model:
            raise ConfigError(f"eval.pretrained={shown}: the checkpoint has no model config (client state "
                              "`config.model`); was it written by launch/train.py?")
        fields_ = read_model_config(model, shown)
        check_fits_every_split(build_model_config(fields_, cfg, shown), manifests, shown)
        out["state"], stage = consolidate(folder, tag, client)
    print(f"loaded encoder from {shown}: ZeRO stage {stage}, step {client.get('step')}", flush=True)
    return {"kind": "zero-checkpoint", "model": fields_, "source": shown, "tag": tag,
            "step": client.get("step"), "zero_stage": stage}

"""Downstream evaluation on BigEarthNet-MM: linear probing and fine-tuning from any pretrained encoder.

The flow, as the sections of this file::

    eval.pretrained -> load_pretrained -> (check against the shards) -> LinearProbe | FineTuner
                    -> multilabel_metrics on the test split -> results.json + a table

- **Pretrained weights** (`load_pretrained`): a DeepSpeed training checkpoint of any
  ZeRO stage (a checkpoint folder with ``latest``, or one ``step-N`` folder), consolidated
  by DeepSpeed's own ``zero_to_fp32`` after downloading the step with `CheckpointStore`;
  an exported ``encoder.safetensors``; or ``none`` (random initialisation). The model
  config comes with the weights (client state ``config.model`` / ``encoder_config.json``)
  and is checked against the shards (band counts, patch size vs ``data.image_size``).
- **Label fraction** (`select_subset`): a seeded, stratified subset of the training split
  chosen from the labels of every training sample sorted by key, so it does not depend
  on the number of processes.
- **Linear probing** (`LinearProbe`): frozen encoder, pooled features of every split
  extracted once (no augmentation) and cached in memory and on disk, a linear head
  trained on standardised features.
- **Fine-tuning** (`FineTuner`): encoder + linear head under DDP (one process or many),
  layer-wise learning-rate decay, the pretraining augmentation on the training split,
  checkpoints every N epochs and ``eval.resume=auto``.
- **Model selection**: the epoch with the best validation macro mAP; its weights give the
  test numbers (`multilabel_metrics`: mAP macro / micro, F1 at 0.5, per-class AP).

Labels are the 19-class BigEarthNet nomenclature (``label_vector`` in each sample's json);
images are normalised with the *training split's* statistics for every split.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from launch import distributed
from launch.augment import DeviceAugment
from launch.checkpoint import LATEST as CHECKPOINT_LATEST
from launch.checkpoint import CheckpointStore
from launch.config import ConfigError
from launch.eval_config import EvalConfig, save_eval_config
from launch.loader import Manifest, ShardLoader, load_manifest
from model import FusMAE, FusMAEConfig
from pipeline.sources.bigearthnet import BIGEARTHNET_19_CLASSES
from pipeline.storage import is_local, put_atomic, read_bytes, redact_url, retrying, url_to_fs, write_bytes_atomic

log = logging.getLogger("launch.evaluate")

SPLITS = ("train", "val", "test")
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
"""DeepSpeed's file with the module and the client state: ZeRO 0-2, ZeRO 3."""
EXPORT_WEIGHTS, EXPORT_CONFIG = "encoder.safetensors", "encoder_config.json"
RUNTIME_FIELDS = ("fused_attn", "grad_checkpointing")
"""FusMAEConfig fields that change how the network runs, not its weights: taken from the eval config."""
HEAD_INIT_STD = 0.01
FEATURE_CACHE_VERSION = 1


# ============================================================================ processes


@dataclass
class Runtime:
    """Where this process stands: rank, world size, device. World size 1 without a launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def start(cls) -> "Runtime":
        # Under deepspeed / torchrun / srun the launcher's variables are there; plain `python -m launch.eval`
        # is one process and needs no process group (nor a free MASTER_PORT).
        if any(k in os.environ for k in ("RANK", "SLURM_PROCID")):
            rank, world, local = distributed.init()
        else:
            rank, world, local = 0, 1, 0
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank, world, local, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any, everywhere: bool = True) -> Optional[list[Any]]:
        """``obj`` of every rank, in rank order, on every rank (or on rank 0 only; None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out: Optional[list[Any]] = [None] * self.world_size if (everywhere or self.is_main) else None
        if everywhere:
            dist.all_gather_object(out, obj)
        else:
            dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        return obj if self.world_size == 1 else distributed.broadcast_object(obj)

    def barrier(self) -> None:
        if self.world_size > 1:
            distributed.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, its result on every rank; a ConfigError there is raised everywhere
        (instead of leaving the other ranks waiting in a collective)."""
        if self.world_size == 1:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except ConfigError as err:
                outcome = ("error", str(err))
            except Exception as err:
                outcome = ("crash", f"{type(err).__name__}: {err}")
                self.broadcast(outcome)
                raise
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise ConfigError(value)
        if kind == "crash":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def sync_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module``."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)


# ============================================================================ pretrained weights


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


def locate_pretrained(url: str, storage_options: Optional[dict[str, Any]] = None) -> str:
    """What ``eval.pretrained`` names: checkpoint-dir (with ``latest``), checkpoint-step (a ``step-N``
    folder or a folder of DeepSpeed files) or export (``encoder.safetensors`` or its folder)."""
    shown = redact_url(url)
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    hint = ("expected a training checkpoint folder (with `latest`), one of its step-N folders, or an "
            "exported encoder.safetensors (or its folder), or `none`")
    if path.endswith(".safetensors"):
        if not fs.exists(path):
            raise ConfigError(f"eval.pretrained={shown}: not found ({hint})")
        return "export"
    if not fs.exists(path):
        raise ConfigError(f"eval.pretrained={shown}: not found ({hint})")
    if fs.exists(f"{path}/{CHECKPOINT_LATEST}"):
        return "checkpoint-dir"
    if path.rsplit("/", 1)[-1].startswith("step-") or any(fs.exists(f"{path}/{f}") for f in MODEL_STATES):
        return "checkpoint-step"
    if fs.exists(f"{path}/{EXPORT_WEIGHTS}"):
        return "export"
    raise ConfigError(f"eval.pretrained={shown}: holds neither a checkpoint nor an exported encoder ({hint})")


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
    try:
        return FusMAEConfig(**merged)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: its model config does not build a network: {err}") from err


def check_data_matches_model(model_cfg: FusMAEConfig, manifests: dict[str, Manifest], source: str) -> None:
    """The shards must hold the bands the encoder was built for (only the modalities its fusion uses)."""
    for split, m in manifests.items():
        for key, mod, used in (("s1_channels", "s1", model_cfg.uses_s1), ("s2_channels", "s2", model_cfg.uses_s2)):
            have = len(m.modalities[mod]["bands"])
            want = getattr(model_cfg, key)
            if used and want != have:
                raise ConfigError(f"model.{key}={want} (from {source}) but the {split} shards "
                                  f"{redact_url(m.url)} hold {have} {mod.upper()} bands {m.modalities[mod]['bands']}")


def _load_state(state_dict: dict[str, Tensor], net: FusMAE, source: str) -> None:
    """Load the encoder part of a (full-model or encoder) state dict, strictly."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    state = {k: v for k, v in state.items() if not k.startswith("decoder")}
    try:
        net.load_encoder_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{source}: the weights do not fit the network of its own config ({err})") from err


class CheckpointReader:
    """One step of a DeepSpeed training checkpoint, downloaded if remote, and its consolidated weights."""

    def __init__(self, url: str, kind: str, staging: str, storage_options: Optional[dict[str, Any]] = None):
        self.url, self.shown = url.rstrip("/"), redact_url(url.rstrip("/"))
        self.storage_options = storage_options or {}
        self.staging = staging
        fs, path = url_to_fs(self.url, self.storage_options)
        path = path.rstrip("/")
        self.local = is_local(fs)
        if kind == "checkpoint-dir":
            store = CheckpointStore(self.url, staging, 0, 1, keep=1, storage_options=self.storage_options)
            try:
                found = store.latest()
            except (RuntimeError, ValueError, KeyError) as err:  # incomplete step, or not our `latest` pointer
                raise ConfigError(f"eval.pretrained={self.shown}: not a usable training checkpoint folder "
                                  f"({type(err).__name__}: {err})") from err
            if found is None:
                raise ConfigError(f"eval.pretrained={self.shown}: no committed checkpoint there")
            self.store, self.committed, self.tag = store, found, found.tag
            self.root = path
        else:  # one step folder: its parent holds <tag>/ as DeepSpeed expects
            self.root, _, self.tag = path.rpartition("/")
            self.committed = None
            if not self.local:  # a remote step must be complete (every rank's record) before downloading it
                self.store = CheckpointStore(self.url.rpartition("/")[0], staging, 0, 1, keep=1,
                                             storage_options=self.storage_options)
                try:
                    self.store, self.committed = self.store.resolve(self.url)
                except FileNotFoundError as err:
                    raise ConfigError(f"eval.pretrained={self.shown}: not a complete checkpoint step "
                                      f"(no `_ranks` records of every rank)") from err

    @contextlib.contextmanager
    def folder(self) -> Iterator[str]:
        """A local folder holding ``<tag>/`` with the DeepSpeed files (the original one when local)."""
        if self.local:
            yield self.root
            return
        os.makedirs(self.staging, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.staging, prefix="pretrained-") as tmp:
            print(f"downloading checkpoint {self.shown} ({self.tag})", flush=True)
            self.store.fetch(self.committed, tmp)
            yield tmp

    @staticmethod
    def client_state(folder: str, tag: str) -> tuple[dict[str, Any], str]:
        for name in MODEL_STATES:
            path = os.path.join(folder, tag, name)
            if os.path.exists(path):
                # The client state holds plain Python objects (config, loader state): not weights_only.
                return torch.load(path, map_location="cpu", weights_only=False), name
        raise ConfigError(f"{folder}/{tag}: no DeepSpeed model states file ({' or '.join(MODEL_STATES)})")

    @staticmethod
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


def load_pretrained(cfg: EvalConfig, manifests: dict[str, Manifest], rt: Runtime) -> Pretrained:
    """The encoder named by ``eval.pretrained`` (on rank 0 read from storage, then copied to every rank)."""
    e = cfg.eval
    source = redact_url(e.pretrained) if not e.random_init else "none"
    if e.random_init:
        fields_ = {k: v for k, v in dataclasses.asdict(cfg.model).items()}
        model_cfg = build_model_config(fields_, cfg, "model.* of the eval config")
        check_data_matches_model(model_cfg, manifests, "model.* of the eval config (eval.pretrained=none)")
        torch.manual_seed(e.seed)  # the baseline's initialisation is part of the seeded run
        net = encoder_only(FusMAE(model_cfg))
        return Pretrained(net, "none", "none", weights_digest(net.encoder_state_dict()))

    loaded: dict[str, Any] = {}

    def read() -> dict[str, Any]:
        kind = locate_pretrained(e.pretrained, e.storage_options)
        if kind == "export":
            return _read_export(cfg, manifests, loaded)
        return _read_checkpoint(cfg, manifests, kind, loaded)

    info = rt.on_main(read)
    model_cfg = build_model_config(info["model"], cfg, info["source"])
    net = encoder_only(FusMAE(model_cfg))
    if rt.is_main:
        _load_state(loaded["state"], net, info["source"])
    rt.sync_module(net.to(rt.device))  # on the device: NCCL broadcasts GPU tensors only
    digest = rt.broadcast(weights_digest(net.encoder_state_dict()) if rt.is_main else None)
    return Pretrained(net, info["kind"], source, digest, info.get("tag"), info.get("step"), info.get("zero_stage"))


def _read_export(cfg: EvalConfig, manifests: dict[str, Manifest], out: dict[str, Any]) -> dict[str, Any]:
    from launch.export import load_encoder

    e = cfg.eval
    shown = redact_url(e.pretrained)
    fs, path = url_to_fs(e.pretrained, e.storage_options)
    root = path.rstrip("/")
    root = root.rsplit("/", 1)[0] if root.endswith(".safetensors") else root
    try:
        meta = json.loads(read_bytes(fs, f"{root}/{EXPORT_CONFIG}"))
    except FileNotFoundError as err:
        raise ConfigError(f"eval.pretrained={shown}: no {EXPORT_CONFIG} beside the weights") from err
    fields_ = read_model_config(meta.get("model", {}), shown)
    model_cfg = build_model_config(fields_, cfg, shown)
    check_data_matches_model(model_cfg, manifests, shown)  # before reading the weights
    net, _ = load_encoder(e.pretrained, e.storage_options)
    out["state"] = net.encoder_state_dict()
    return {"kind": "export", "model": fields_, "source": shown, "step": meta.get("step")}


def _read_checkpoint(cfg: EvalConfig, manifests: dict[str, Manifest], kind: str,
                     out: dict[str, Any]) -> dict[str, Any]:
    e = cfg.eval
    reader = CheckpointReader(e.pretrained, kind, os.path.join(cfg.run.dir, "staging"), e.storage_options)
    shown = f"{reader.shown}" if kind == "checkpoint-step" else f"{reader.shown} ({reader.tag})"
    with reader.folder() as folder:
        client, _ = reader.client_state(folder, reader.tag)
        model = (client.get("config") or {}).get("model")
        if not model:
            raise ConfigError(f"eval.pretrained={shown}: the checkpoint has no model config (client state "
                              "`config.model`); was it written by launch/train.py?")
        fields_ = read_model_config(model, shown)
        check_data_matches_model(build_model_config(fields_, cfg, shown), manifests, shown)
        out["state"], stage = reader.consolidate(folder, reader.tag, client)
    print(f"loaded encoder from {shown}: ZeRO stage {stage}, step {client.get('step')}", flush=True)
    return {"kind": "zero-checkpoint", "model": fields_, "source": shown, "tag": reader.tag,
            "step": client.get("step"), "zero_stage": stage}


# ============================================================================ labels and the subset


def class_names(manifest_url: str, num_classes: int, storage_options: Optional[dict[str, Any]] = None) -> list[str]:
    """The label names of the shard set (manifest ``source.label_classes``), else BigEarthNet's 19."""
    try:
        fs, path = url_to_fs(manifest_url, storage_options)
        names = json.loads(read_bytes(fs, path)).get("source", {}).get("label_classes")
    except (OSError, ValueError):
        names = None
    if not names:
        names = list(BIGEARTHNET_19_CLASSES)
    if len(names) != num_classes:
        return [f"class_{i}" for i in range(num_classes)]
    return list(names)


def subset_size(n: int, fraction: float) -> int:
    """round(fraction x n) (halves up), at least 1."""
    return n if fraction >= 1.0 else max(1, min(n, int(math.floor(fraction * n + 0.5))))


def select_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a stratified subset of ``subset_size(N, fraction)`` multi-label samples.

    labels: (N, C) 0/1, rows in a fixed order (the training split sorted by key). Deterministic
    in (labels, fraction, seed).

    1. Coverage: while some class present in ``labels`` has no sample in the subset and the size
       allows, take a sample of the rarest uncovered class, preferring samples that carry the most
       uncovered classes (a greedy set cover), ties in a seeded random order.
    2. Iterative stratification (Sechidis et al., 2011) of the rest into two folds, the subset and
       the remainder, with target sizes that make the subset exactly the requested size: the rarest
       remaining label first, each of its samples to the fold that still wants that label most.
    """
    labels = np.asarray(labels).astype(bool)
    N, C = labels.shape
    n = subset_size(N, fraction)
    if n >= N:
        return np.arange(N)
    rng = np.random.default_rng([seed, N, n])
    priority = np.empty(N, dtype=np.int64)
    priority[rng.permutation(N)] = np.arange(N)  # the seeded random order that breaks every tie
    counts = labels.sum(0)
    chosen = np.zeros(N, dtype=bool)

    uncovered = counts > 0
    while uncovered.any() and chosen.sum() < n:
        c = int(np.argmin(np.where(uncovered, counts, np.iinfo(np.int64).max)))
        cand = np.flatnonzero(labels[:, c] & ~chosen)
        gain = labels[cand][:, uncovered].sum(1)
        best = cand[np.lexsort((priority[cand], -gain))[0]]
        chosen[best] = True
        uncovered &= ~labels[best]

    # Remaining wishes per fold and class, and remaining sizes (0: subset, 1: the rest).
    want = np.stack([fraction * counts - labels[chosen].sum(0), (1 - fraction) * counts]).astype(np.float64)
    size = np.array([n - chosen.sum(), N - n], dtype=np.int64)
    free = ~chosen
    assigned = np.full(N, -1, dtype=np.int64)
    while True:
        pool = free & labels.any(1)
        if not pool.any():
            break
        left = labels[pool].sum(0)
        c = int(np.argmin(np.where(left > 0, left, np.iinfo(np.int64).max)))
        members = np.flatnonzero(pool & labels[:, c])
        for i in members[np.argsort(priority[members])]:
            if size[0] == 0 or size[1] == 0:
                fold = 1 if size[0] == 0 else 0
            elif want[0, c] != want[1, c]:  # the fold that wants this label most
                fold = int(want[1, c] > want[0, c])
            elif size[0] != size[1]:  # then the fold that wants the most samples
                fold = int(size[1] > size[0])
            else:
                fold = int(rng.random() >= fraction)
            assigned[i] = fold
            want[fold, labels[i]] -= 1
            size[fold] -= 1
            free[i] = False
    # Samples without any label fill what is left of the subset, in the seeded order.
    rest = np.flatnonzero(free)
    rest = rest[np.argsort(priority[rest])]
    assigned[rest[: size[0]]] = 0
    return np.flatnonzero(chosen | (assigned == 0))


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def describe_subset(labels: np.ndarray, idx: np.ndarray, keys: list[str], fraction: float, seed: int) -> dict[str, Any]:
    lab = np.asarray(labels).astype(bool)
    return {"label_fraction": fraction, "seed": seed, "size": int(len(idx)), "of": int(len(keys)),
            "keys_sha256": keys_digest([keys[i] for i in idx]),
            "classes_present": int((lab.sum(0) > 0).sum()), "classes_in_subset": int((lab[idx].sum(0) > 0).sum())}


# ============================================================================ metrics


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Average precision of one binary problem as scikit-learn defines it: sum over the distinct
    score thresholds, highest first, of (R_k - R_(k-1)) P_k (no interpolation). None without positives."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    positives = int(y.sum())
    if positives == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, names: Optional[list[str]] = None,
                       threshold: float = 0.5) -> dict[str, Any]:
    """Multi-label metrics of probabilities ``probs`` (N, C) against 0/1 ``y_true`` (N, C).

    - map_macro: mean of the per-class AP over the classes with a positive in ``y_true``;
    - map_micro: AP of all (sample, class) pairs together (scikit-learn's ``average="micro"``);
    - f1 (micro) over all pairs, f1_macro the mean per-class F1 over the present classes,
      predictions ``probs >= threshold``;
    - per_class_ap / per_class_f1: name -> value, None for a class absent from ``y_true``.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"y_true {y.shape} and probs {p.shape} must be the same (N, C) shape")
    names = names or [f"class_{i}" for i in range(y.shape[1])]
    pred = p >= threshold
    aps = [average_precision(y[:, c], p[:, c]) for c in range(y.shape[1])]
    tp = (pred & y).sum(0)
    fp = (pred & ~y).sum(0)
    fn = (~pred & y).sum(0)
    present = y.sum(0) > 0
    f1s = [float(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c])) if present[c] else None for c in range(y.shape[1])]
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    valid_ap = [a for a in aps if a is not None]
    valid_f1 = [f for f in f1s if f is not None]
    return {
        "map_macro": float(np.mean(valid_ap)) if valid_ap else None,
        "map_micro": average_precision(y.ravel(), p.ravel()),
        "f1": float(2 * tp.sum() / denom) if denom else 0.0,
        "f1_macro": float(np.mean(valid_f1)) if valid_f1 else None,
        "per_class_ap": dict(zip(names, aps)),
        "per_class_f1": dict(zip(names, f1s)),
        "num_samples": int(y.shape[0]),
        "classes_present": int(present.sum()),
    }


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """The per-class AP and the headline numbers as a text table."""
    width = max([len(n) for n in metrics["per_class_ap"]] + [10])
    width = min(width, 60)
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'AP':>6}  {'F1':>6}")
    lines.append("-" * (width + 16))
    for name, ap in metrics["per_class_ap"].items():
        f1 = metrics.get("per_class_f1", {}).get(name)
        show = name if len(name) <= width else name[: width - 1] + "…"
        lines.append(f"{show:<{width}}  {'  -   ' if ap is None else f'{ap:6.3f}'}  "
                     f"{'  -   ' if f1 is None else f'{f1:6.3f}'}")
    lines.append("-" * (width + 16))

    def num(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines.append(f"mAP macro {num(metrics['map_macro'])}   mAP micro {num(metrics['map_micro'])}   "
                 f"F1 micro {num(metrics['f1'])}   F1 macro {num(metrics['f1_macro'])}   "
                 f"({metrics['num_samples']} samples, {metrics['classes_present']} classes present)")
    return "\n".join(lines)


# ============================================================================ data passes


@dataclass
class SplitOutput:
    """One value row per sample of a split, sorted by key (independent of the number of processes)."""

    keys: list[str]
    labels: np.ndarray
    """(N, C) uint8."""
    values: np.ndarray
    """(N, K) float32: pooled features or class probabilities."""


class EvalData:
    """The three labelled splits: manifests, one finite loader per split, normalisation on the device."""

    def __init__(self, cfg: EvalConfig, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        d = cfg.data
        urls = {"train": d.train_manifest, "val": d.val_manifest, "test": d.test_manifest}
        self.manifests: dict[str, Manifest] = {}
        for split, url in urls.items():
            try:
                self.manifests[split] = load_manifest(url, d.storage_options)
            except FileNotFoundError as err:
                raise ConfigError(f"data.{split}_manifest: {err}") from err
            except ValueError as err:
                raise ConfigError(f"data.{split}_manifest: {err}") from err
        # Every split is normalised with the training split's statistics.
        self.augment = DeviceAugment(self.manifests["train"], d.image_size).to(rt.device)
        self._loaders: dict[str, ShardLoader] = {}

    def loader(self, split: str) -> ShardLoader:
        if split not in self._loaders:
            d = self.cfg.data
            self._loaders[split] = ShardLoader(
                self.manifests[split], micro_batch_size=self.cfg.eval.eval_batch_size, rank=self.rt.rank,
                world_size=self.rt.world_size, num_workers=d.num_workers, finite=True, with_meta=True,
                cache_dir=d.cache_dir, storage_options=dict(d.storage_options))
        return self._loaders[split]

    def images(self, batch: dict[str, Any], augment: bool = False) -> tuple[Tensor, Tensor]:
        """Raw batch -> normalised (B, 2, S, S), (B, C, S, S) float32 on the device; resize only unless augment."""
        if not augment:
            batch = {k: v for k, v in batch.items() if k not in ("crop", "flip")}
        s1, s2, _ = self.augment(batch, self.rt.device)
        return s1, s2

    def run(self, split: str, fn: Optional[Callable[[Tensor, Tensor], Tensor]], desc: str,
            everywhere: bool = True) -> Optional[SplitOutput]:
        """One pass over ``split`` (this rank's part), ``fn(s1, s2) -> (B, K)`` per batch, gathered and sorted
        on every rank (everywhere) or on rank 0 only (None elsewhere). fn=None reads only keys and labels."""
        keys: list[str] = []
        labels: list[list[int]] = []
        outs: list[np.ndarray] = []
        loader = self.loader(split)
        for batch in tqdm(loader, total=len(loader), desc=desc, disable=not self.rt.is_main, leave=False,
                          dynamic_ncols=True):
            keys.extend(batch["keys"])
            labels.extend(_label_vector(m, k) for m, k in zip(batch["meta"], batch["keys"]))
            if fn is not None:
                s1, s2 = self.images(batch)
                with torch.no_grad():
                    outs.append(fn(s1, s2).float().cpu().numpy())
        values = np.concatenate(outs) if outs else np.zeros((len(keys), 0), np.float32)
        parts = self.rt.gather((keys, np.asarray(labels, dtype=np.uint8).reshape(len(keys), -1), values), everywhere)
        if parts is None:
            return None
        all_keys = [k for p in parts for k in p[0]]
        if not all_keys:
            raise ConfigError(f"the {split} split {redact_url(self.manifests[split].url)}: no sample could be read")
        order = np.argsort(np.asarray(all_keys, dtype=object), kind="stable")
        lab = np.concatenate([p[1] for p in parts if len(p[0])])
        val = np.concatenate([p[2] for p in parts if len(p[0])])
        if len(set(all_keys)) != len(all_keys):
            raise RuntimeError(f"{split}: duplicate sample keys in the shards")
        return SplitOutput([all_keys[i] for i in order], lab[order], val[order].astype(np.float32))


def _label_vector(meta: dict[str, Any], key: str) -> list[int]:
    vec = (meta or {}).get("label_vector")
    if vec is None:
        raise ConfigError(f"sample {key} has no `label_vector` in its json: evaluation needs labelled shards "
                          "(BigEarthNet preprocessed by pipeline.preprocess --source bigearthnet)")
    return [int(v) for v in vec]


# ============================================================================ caches


class MemoryCache:
    """The last few extracted splits of this process, so that repeated `evaluate` calls of a sweep reuse them."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._items: "OrderedDict[str, SplitOutput]" = OrderedDict()

    def get(self, key: str) -> Optional[SplitOutput]:
        if key in self._items:
            self._items.move_to_end(key)
        return self._items.get(key)

    def put(self, key: str, value: SplitOutput) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


PROCESS_CACHE = MemoryCache()


class SplitCache:
    """Split outputs in memory and, with ``eval.cache_features``, as ``<dir>/<prefix>-<hash>.pt`` files."""

    def __init__(self, cfg: EvalConfig, rt: Runtime, memory: MemoryCache):
        self.enabled = cfg.eval.cache_features
        self.dir = cfg.feature_cache_dir
        self.storage_options = cfg.eval.storage_options
        self.rt, self.memory = rt, memory

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def path(self, prefix: str, key: str) -> str:
        return f"{self.dir.rstrip('/')}/{prefix}-{key}.pt"

    def get_or_make(self, prefix: str, key: str, make: Callable[[], Optional[SplitOutput]], what: str,
                    everywhere: bool = True) -> Optional[SplitOutput]:
        """The cached output under ``key``, else ``make()`` (run by every rank: it may be collective).
        everywhere=False: only rank 0 needs the result (the others get None)."""
        hit = self.memory.get(key) if self.rt.is_main else None
        found = self.rt.broadcast(hit is not None)
        if found:
            return self.rt.broadcast(hit) if everywhere else hit
        url = self.path(prefix, key)
        out = self._read(url) if (self.enabled and self.rt.is_main) else None
        if self.rt.broadcast(out is not None):
            if self.rt.is_main:
                print(f"{what}: cached in {redact_url(url)}", flush=True)
            out = self.rt.broadcast(out) if everywhere else out
        else:
            out = make()
            if self.enabled and self.rt.is_main:
                self._write(url, out)
        if self.rt.is_main:
            self.memory.put(key, out)
        return out

    def _read(self, url: str) -> Optional[SplitOutput]:
        fs, path = url_to_fs(url, self.storage_options)
        try:
            data = torch.load(io.BytesIO(read_bytes(fs, path)), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
            log.warning("ignoring unreadable cache %s: %s", redact_url(url), err)
            return None
        return SplitOutput(list(data["keys"]), data["labels"].numpy(), data["values"].numpy())

    def _write(self, url: str, out: SplitOutput) -> None:
        fs, path = url_to_fs(url, self.storage_options)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "cache.pt")
            torch.save({"version": FEATURE_CACHE_VERSION, "keys": out.keys, "labels": torch.from_numpy(out.labels),
                        "values": torch.from_numpy(out.values)}, local)
            put_atomic(fs, local, path)


# ============================================================================ optimisation helpers


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float) -> Callable[[int], float]:
    """Factor of the peak learning rate: linear warm-up, then cosine decay to ``floor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def peak_lr(cfg: EvalConfig, global_batch: int) -> float:
    e = cfg.eval
    return e.lr * global_batch / e.lr_reference_batch if e.lr_reference_batch else e.lr


def make_optimizer(cfg: EvalConfig, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    e = cfg.eval
    if e.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=e.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(e.betas))


def make_schedule(cfg: EvalConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                  lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    e = cfg.eval
    floor = min(1.0, e.min_lr / lr) if lr > 0 else 0.0
    factor = warmup_cosine(int(round(e.warmup_epochs * steps_per_epoch)), e.epochs * steps_per_epoch, floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Multi-label loss: mean binary cross-entropy over samples and classes, in float32."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


# ============================================================================ linear probing


class LinearProbe:
    """Frozen encoder, pooled features cached once per split, a linear head trained on the training subset.

    Features are standardised with the subset's per-dimension mean and std (the role of MAE's
    BatchNorm without affine parameters before its linear probe).
    """

    def __init__(self, cfg: EvalConfig, rt: Runtime, data: EvalData, pretrained: Pretrained, cache: SplitCache):
        self.cfg, self.rt, self.data, self.pretrained, self.cache = cfg, rt, data, pretrained, cache
        self.encoder = pretrained.net.to(rt.device).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.autocast_enabled = cfg.eval.bf16 and rt.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_enabled)

    def features(self, split: str) -> Optional[SplitOutput]:
        """Pooled features of every sample of ``split`` on rank 0 (None on the other ranks)."""
        m = self.data.manifests[split]
        net_cfg = {k: v for k, v in self.pretrained.cfg.to_dict().items() if k not in RUNTIME_FIELDS}
        key = self.cache.key(kind="features", version=FEATURE_CACHE_VERSION, weights=self.pretrained.digest,
                             model=net_cfg, manifest=m.fingerprint, image_size=self.cfg.data.image_size,
                             stats=self.data.manifests["train"].stats, bf16=self.autocast_enabled)
        return self.cache.get_or_make(
            "features", key, lambda: self.data.run(split, self.encode, f"features {split}", everywhere=False),
            f"features of {split}", everywhere=False)

    def encode(self, s1: Tensor, s2: Tensor) -> Tensor:
        c = self.pretrained.cfg
        with self.autocast:
            return self.encoder.encode(s1 if c.uses_s1 else None, s2 if c.uses_s2 else None)  # (B, D)

    def run(self) -> Optional[dict[str, Any]]:
        cfg, e = self.cfg, self.cfg.eval
        feats = {s: self.features(s) for s in SPLITS}
        if not self.rt.is_main:
            return None
        train = feats["train"]
        idx = select_subset(train.labels, e.label_fraction, e.seed)
        subset = describe_subset(train.labels, idx, train.keys, e.label_fraction, e.seed)
        x = torch.from_numpy(train.values[idx])
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        X = {s: (torch.from_numpy(feats[s].values) - mean) / std for s in SPLITS}
        X["train"] = X["train"][idx]
        Y = {s: torch.from_numpy(feats[s].labels).float() for s in SPLITS}
        Y["train"] = Y["train"][idx]

        g = torch.Generator().manual_seed(e.seed)
        D, C = X["train"].shape[1], Y["train"].shape[1]
        head = nn.Linear(D, C)
        with torch.no_grad():
            head.weight.normal_(0.0, HEAD_INIT_STD, generator=g)
            head.bias.zero_()
        n = len(idx)
        bs = min(e.batch_size, n)
        steps = math.ceil(n / bs)
        lr = peak_lr(cfg, bs)
        groups = [{"params": [head.weight], "weight_decay": e.weight_decay},
                  {"params": [head.bias], "weight_decay": 0.0}]
        opt = make_optimizer(cfg, groups, lr)
        sched = make_schedule(cfg, opt, steps, lr)
        names = self.data_names(C)

        best = (-1.0, 0, copy.deepcopy(head.state_dict()))
        history = []
        bar = tqdm(range(e.epochs), desc="linear probe", dynamic_ncols=True)
        for epoch in bar:
            perm = torch.randperm(n, generator=g)
            total = torch.zeros(())
            for b in range(steps):
                sel = perm[b * bs:(b + 1) * bs]
                loss = bce(head(X["train"][sel]), Y["train"][sel])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach()
            train_loss = float(total) / steps
            if not math.isfinite(train_loss):
                raise RuntimeError(f"linear probe: non-finite training loss at epoch {epoch + 1}")
            with torch.no_grad():
                val = multilabel_metrics(feats["val"].labels, torch.sigmoid(head(X["val"])).numpy(), names)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_map_macro": val["map_macro"]})
            score = val["map_macro"] if val["map_macro"] is not None else -1.0
            if score > best[0]:
                best = (score, epoch + 1, copy.deepcopy(head.state_dict()))
            bar.set_postfix(loss=f"{train_loss:.4f}", val_map=f"{score:.4f}", best=best[1], refresh=False)
        head.load_state_dict(best[2])
        with torch.no_grad():
            probs = torch.sigmoid(head(X["test"])).numpy()
        test = multilabel_metrics(feats["test"].labels, probs, names)
        return {"test": test, "best_epoch": best[1], "val_map_macro": best[0], "history": history,
                "subset": subset, "lr": lr, "batch_size": bs}

    def data_names(self, num_classes: int) -> list[str]:
        return class_names(self.cfg.data.test_manifest, num_classes, self.cfg.data.storage_options)


# ============================================================================ fine-tuning


class Classifier(nn.Module):
    """The encoder's pooled features (``encode``) and a linear multi-label head: (B, num_classes) logits."""

    def __init__(self, encoder: FusMAE, num_classes: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.cfg.embed_dim, num_classes)
        with torch.no_grad():
            self.head.weight.normal_(0.0, HEAD_INIT_STD, generator=generator)
            self.head.bias.zero_()

    def forward(self, s1: Optional[Tensor], s2: Optional[Tensor]) -> Tensor:
        c = self.encoder.cfg
        feats = self.encoder.encode(s1 if c.uses_s1 else None, s2 if c.uses_s2 else None)  # (B, D)
        return self.head(feats)


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float,
                       encoder_lr_scale: float) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise learning-rate decay (BEiT, MAE fine-tuning).

    With n encoder blocks, layer 0 is everything before the blocks (patch embeddings, modality
    embeddings, CLS token), block i is layer i + 1, the final norm and the head are layer n + 1.
    A layer's rate is lr x layer_decay^(n + 1 - layer), times encoder_lr_scale for the encoder.
    No weight decay on biases, norms and learned tokens (``FusMAE.no_weight_decay``).
    """
    n = len(model.encoder.blocks)
    skip = {f"encoder.{k}" for k in model.encoder.no_weight_decay()} | {"head.bias"}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            layer, scale = n + 1, 1.0
        else:
            sub = name[len("encoder."):]
            layer = int(sub.split(".")[1]) + 1 if sub.startswith("blocks.") else (n + 1 if sub.startswith("norm") else 0)
            scale = layer_decay ** (n + 1 - layer) * encoder_lr_scale
        no_decay = name in skip
        g = groups.setdefault((layer if name.startswith("encoder.") else -1, no_decay), {
            "params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * scale,
            "lr_scale": scale, "layer": layer})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


class SubsetStream:
    """Training batches of exactly ``batch_size`` samples of the subset, from the infinite shuffled loader.

    The loader streams the whole training split (shuffled, with crop boxes and flips drawn per
    sample); samples outside the subset are dropped and the rest regrouped into full batches. The
    position is the loader's own state plus the few samples read but not yet emitted.
    """

    TENSORS = ("s1", "s2", "crop", "flip")

    def __init__(self, loader: ShardLoader, keys: set[str], batch_size: int):
        self.loader, self.keys, self.batch_size = loader, keys, batch_size
        self.pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any], same_layout: bool) -> None:
        self.loader.load_state_dict(state["loader"])
        self.pending = state["pending"] if same_layout else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for raw in self.loader:
            keep = [i for i, k in enumerate(raw["keys"]) if k in self.keys]
            if not keep:
                continue
            part = {k: raw[k][keep] for k in self.TENSORS}
            part["keys"] = [raw["keys"][i] for i in keep]
            if self.pending is not None:
                part = {k: (torch.cat([self.pending[k], part[k]]) if k != "keys" else self.pending[k] + part[k])
                        for k in part}
            self.pending = part
            while self.pending is not None and len(self.pending["keys"]) >= self.batch_size:
                b = self.batch_size
                batch = {k: v[:b] for k, v in self.pending.items()}
                rest = {k: v[b:] for k, v in self.pending.items()}
                self.pending = rest if rest["keys"] else None  # set before yielding: a checkpoint may follow
                yield batch


class FineTuneCheckpoints:
    """Fine-tuning state under one fsspec URL, committed by a pointer written last::

        epoch-00003/state.pt             model, optimizer, schedule, best weights, history (rank 0)
        epoch-00003/stream-rank<r>.pt    the training stream position of rank r
        latest                           {"tag": "epoch-00003", "epoch": 3, "world_size": W}
    """

    def __init__(self, url: str, rt: Runtime, storage_options: Optional[dict[str, Any]] = None):
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url, storage_options or {})
        self.root = self.root.rstrip("/")
        self.rt = rt

    def latest(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(read_bytes(self.fs, f"{self.root}/latest"))
        except FileNotFoundError:
            return None

    def _put(self, obj: Any, dest: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "part.pt")
            torch.save(obj, local)
            put_atomic(self.fs, local, dest)

    def _get(self, path: str) -> Any:
        # Our own files, holding optimizer states and Python objects: not weights_only.
        return torch.load(io.BytesIO(read_bytes(self.fs, path)), map_location="cpu", weights_only=False)

    def save(self, epoch: int, state: Optional[dict[str, Any]], stream: dict[str, Any]) -> None:
        """Every rank writes its stream; rank 0 the state, then (after all) the pointer; older epochs go."""
        tag = f"epoch-{epoch:05d}"
        self._put(stream, f"{self.root}/{tag}/stream-rank{self.rt.rank}.pt")
        if self.rt.is_main:
            self._put(state, f"{self.root}/{tag}/state.pt")
        self.rt.barrier()
        if self.rt.is_main:
            pointer = {"tag": tag, "epoch": epoch, "world_size": self.rt.world_size,
                       "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_bytes_atomic(self.fs, f"{self.root}/latest", json.dumps(pointer, sort_keys=True).encode())
            for entry in self.fs.ls(self.root, detail=False, refresh=True):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("epoch-") and name != tag:
                    retrying(self.fs.rm)(f"{self.root}/{name}", recursive=True)
        self.rt.barrier()

    def load(self, pointer: dict[str, Any]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """The state and this rank's stream (None when the world size changed)."""
        tag = pointer["tag"]
        state = self._get(f"{self.root}/{tag}/state.pt")
        if pointer["world_size"] == self.rt.world_size:
            return state, self._get(f"{self.root}/{tag}/stream-rank{self.rt.rank}.pt")
        return state, self._get(f"{self.root}/{tag}/stream-rank0.pt")


RESUME_IGNORED = {
    "eval": ("resume", "stop_at_epoch", "checkpoint_every", "checkpoint_dir", "cache_features", "feature_cache_dir",
             "storage_options", "eval_batch_size"),
    "data": ("num_workers", "cache_dir", "storage_options"),
    "run": ("dir",),
}


def resume_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoint (credentials redacted)."""
    d = cfg.to_dict(redacted=True)
    for section, keys in RESUME_IGNORED.items():
        for k in keys:
            d[section].pop(k, None)
    for k in RUNTIME_FIELDS:
        d["model"].pop(k, None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


class FineTuner:
    """Encoder + linear head trained end to end (DDP over every process), best epoch by validation mAP."""

    def __init__(self, cfg: EvalConfig, rt: Runtime, data: EvalData, pretrained: Pretrained, cache: SplitCache):
        self.cfg, self.rt, self.data, self.pretrained, self.cache = cfg, rt, data, pretrained, cache
        e = cfg.eval

        # The subset, from the labels of the whole training split (sorted by key: the same for any world size).
        m = data.manifests["train"]
        key = cache.key(kind="labels", manifest=m.fingerprint)
        index = cache.get_or_make("labels", key, lambda: data.run("train", None, "labels train"), "training labels")
        self.index = index
        idx = select_subset(index.labels, e.label_fraction, e.seed)
        self.subset = describe_subset(index.labels, idx, index.keys, e.label_fraction, e.seed)
        self.subset_keys = {index.keys[i] for i in idx}
        self.row_of = {k: i for i, k in enumerate(index.keys)}
        self.names = class_names(cfg.data.test_manifest, index.labels.shape[1], cfg.data.storage_options)

        g = torch.Generator().manual_seed(e.seed)
        self.model = Classifier(pretrained.net, index.labels.shape[1], generator=g).to(rt.device)
        self.model.train()
        self.ddp: nn.Module = self.model
        if rt.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)

        self.global_batch = e.batch_size * rt.world_size
        self.steps_per_epoch = max(1, math.ceil(len(idx) / self.global_batch))
        self.lr = peak_lr(cfg, self.global_batch)
        groups = layer_decay_groups(self.model, self.lr, e.weight_decay, e.layer_decay, e.encoder_lr_scale)
        for gr in groups:
            gr.pop("names")
        self.optimizer = make_optimizer(cfg, groups, self.lr)
        self.scheduler = make_schedule(cfg, self.optimizer, self.steps_per_epoch, self.lr)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=e.bf16 and rt.device.type == "cuda")

        d = cfg.data
        loader = ShardLoader(m, micro_batch_size=e.batch_size, rank=rt.rank, world_size=rt.world_size,
                             num_workers=d.num_workers, seed=e.seed, shuffle_buffer=d.shuffle_buffer,
                             crop_scale_min=d.crop_scale_min, hflip=d.hflip, vflip=d.vflip, cache_dir=d.cache_dir,
                             storage_options=dict(d.storage_options), finite=False, with_meta=False)
        self.stream = SubsetStream(loader, self.subset_keys, e.batch_size)

        self.epoch = 0
        self.best: dict[str, Any] = {"epoch": 0, "val_map_macro": -1.0, "weights": None}
        self.history: list[dict[str, Any]] = []
        self.store = FineTuneCheckpoints(cfg.checkpoint_dir, rt, e.storage_options) if e.checkpoint_every else None
        self._resume()

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "best": self.best, "history": self.history,
                "settings": resume_settings(self.cfg), "subset": self.subset}

    def _resume(self) -> None:
        e = self.cfg.eval
        if self.store is None:
            if e.resume == "auto":
                raise ConfigError("eval.resume=auto needs checkpoints (eval.checkpoint_every > 0)")
            return
        pointer = self.rt.on_main(self.store.latest)
        shown = redact_url(self.store.url)
        if pointer is None:
            if e.resume == "auto" and self.rt.is_main:
                print(f"eval.resume=auto: no checkpoint in {shown}; starting fresh", flush=True)
            return
        if e.resume == "none":
            raise ConfigError(f"{shown} already holds a fine-tuning checkpoint ({pointer['tag']}): pass "
                              "eval.resume=auto to continue it, or set eval.checkpoint_dir / run.dir elsewhere")
        state, stream = self.store.load(pointer)
        changed = _diff(state["settings"], resume_settings(self.cfg))
        if changed:
            raise ConfigError(f"{shown}/{pointer['tag']} was written with other settings; resume with the same "
                              f"ones or start elsewhere. Differences: {'; '.join(changed)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        same = pointer["world_size"] == self.rt.world_size
        self.stream.load_state_dict(stream, same_layout=same)
        if self.rt.is_main:
            how = "" if same else f" (world size {pointer['world_size']} -> {self.rt.world_size}: the data order differs)"
            print(f"resumed fine-tuning from {shown}/{pointer['tag']} after epoch {self.epoch}{how}", flush=True)

    # ------------------------------------------------------------------- loop
    def train_step(self, batch: dict[str, Any]) -> Tensor:
        rows = [self.row_of[k] for k in batch["keys"]]
        y = torch.from_numpy(self.index.labels[rows]).to(self.rt.device)
        s1, s2 = self.data.images(batch, augment=self.cfg.data.augment)
        with self.autocast:
            logits = self.ddp(s1, s2)
        loss = bce(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.eval.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.eval.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def predict(self, split: str) -> SplitOutput:
        self.model.eval()

        def probs(s1: Tensor, s2: Tensor) -> Tensor:
            with self.autocast:
                return torch.sigmoid(self.model(s1, s2).float())

        out = self.data.run(split, probs, f"predict {split}")
        self.model.train()
        return out

    def train(self) -> Optional[dict[str, Any]]:
        e = self.cfg.eval
        stop = e.epochs if e.stop_at_epoch is None else min(e.stop_at_epoch, e.epochs)
        if self.epoch >= stop and self.rt.is_main:
            print(f"nothing to train: already after epoch {self.epoch}", flush=True)
        batches = iter(self.stream)
        while self.epoch < stop:
            total = torch.zeros((), device=self.rt.device)
            bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{e.epochs}", leave=False,
                       disable=not self.rt.is_main, dynamic_ncols=True)
            for _ in bar:
                total += self.train_step(next(batches))
            train_loss = float(total) / self.steps_per_epoch  # one host read per epoch
            if not math.isfinite(train_loss):
                raise RuntimeError(f"fine-tuning: non-finite training loss in epoch {self.epoch + 1}")
            self.epoch += 1
            val = self.predict("val")
            score = multilabel_metrics(val.labels, val.values, self.names)["map_macro"]
            score = -1.0 if score is None else score
            self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_map_macro": score,
                                 "lr": max(self.scheduler.get_last_lr())})
            if score > self.best["val_map_macro"] or self.best["weights"] is None:
                self.best = {"epoch": self.epoch, "val_map_macro": score,
                             "weights": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
            if self.rt.is_main:
                print(f"epoch {self.epoch}/{e.epochs}: train loss {train_loss:.4f}, val mAP {score:.4f} "
                      f"(best {self.best['val_map_macro']:.4f} at epoch {self.best['epoch']})", flush=True)
            if self.store is not None and (self.epoch % e.checkpoint_every == 0 or self.epoch == stop):
                self.store.save(self.epoch, self._state() if self.rt.is_main else None, self.stream.state_dict())
        if self.epoch < e.epochs:
            if self.rt.is_main:
                print(f"stopped after epoch {self.epoch} of {e.epochs} (eval.stop_at_epoch); continue with "
                      "eval.resume=auto", flush=True)
            return None
        self.model.load_state_dict(self.best["weights"])
        test = self.predict("test")
        if not self.rt.is_main:
            return None
        return {"test": multilabel_metrics(test.labels, test.values, self.names), "best_epoch": self.best["epoch"],
                "val_map_macro": self.best["val_map_macro"], "history": self.history, "subset": self.subset,
                "lr": self.lr, "batch_size": self.global_batch}


# ============================================================================ entry point


def results_document(cfg: EvalConfig, rt: Runtime, pretrained: Pretrained, out: dict[str, Any]) -> dict[str, Any]:
    e = cfg.eval
    test = out["test"]
    config = cfg.to_dict(redacted=True)
    if not e.random_init:  # the architecture came from the checkpoint (settings.model); model.* was not used
        config["model"] = {k: config["model"][k] for k in RUNTIME_FIELDS}
    settings = {
        "protocol": e.protocol,
        "label_fraction": e.label_fraction,
        "seed": e.seed,
        "pretrained": pretrained.source,
        "pretrained_info": pretrained.describe(),
        "model": pretrained.cfg.to_dict(),
        "image_size": cfg.data.image_size,
        "epochs": e.epochs,
        "best_epoch": out["best_epoch"],
        "val_map_macro": out["val_map_macro"],
        "train_subset": out["subset"],
        "optimizer": e.optimizer,
        "lr": out["lr"],
        "batch_size": out["batch_size"],
        "weight_decay": e.weight_decay,
        "world_size": rt.world_size,
        "config": config,
    }
    if e.protocol == "finetune":
        settings.update(layer_decay=e.layer_decay, encoder_lr_scale=e.encoder_lr_scale, augment=cfg.data.augment)
    return {
        "map_macro": test["map_macro"], "map_micro": test["map_micro"], "f1": test["f1"],
        "f1_macro": test["f1_macro"], "per_class_ap": test["per_class_ap"], "per_class_f1": test["per_class_f1"],
        "num_test_samples": test["num_samples"], "test_classes_present": test["classes_present"],
        "settings": settings, "history": out["history"],
    }


def evaluate(cfg: EvalConfig, memory: Optional[MemoryCache] = None) -> Optional[dict[str, Any]]:
    """Run the evaluation ``cfg`` describes; returns the results document on rank 0 (None elsewhere, and
    for a fine-tuning run stopped by eval.stop_at_epoch). Writes ``<run.dir>/results.json`` and prints a table."""
    rt = Runtime.start()
    torch.manual_seed(cfg.eval.seed)
    np.random.seed(cfg.eval.seed)
    os.makedirs(cfg.run.dir, exist_ok=True)
    if rt.is_main:
        save_eval_config(cfg, os.path.join(cfg.run.dir, "eval_config.yaml"))
    data = EvalData(cfg, rt)
    pretrained = load_pretrained(cfg, data.manifests, rt)
    cache = SplitCache(cfg, rt, PROCESS_CACHE if memory is None else memory)
    if cfg.eval.protocol == "linear":
        out = LinearProbe(cfg, rt, data, pretrained, cache).run()
    else:
        out = FineTuner(cfg, rt, data, pretrained, cache).train()
    rt.barrier()
    if out is None or not rt.is_main:
        return None
    doc = results_document(cfg, rt, pretrained, out)
    path = os.path.join(cfg.run.dir, "results.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    title = (f"{cfg.eval.protocol} evaluation of {pretrained.source} on {redact_url(cfg.data.test_manifest)} "
             f"(label fraction {cfg.eval.label_fraction}, seed {cfg.eval.seed}, best epoch {out['best_epoch']}, "
             f"val mAP {out['val_map_macro']:.4f})")
    print(format_table(out["test"], title), flush=True)
    print(f"results written to {path}", flush=True)
    return doc

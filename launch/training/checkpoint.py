"""Checkpoints in object storage: one commit protocol, a writer for training runs, and finding / fetching.

Layout under a checkpoint folder (any fsspec URL)::

    step-00000040/                         one folder per checkpoint (fine-tuning: epoch-00003/)
        mp_rank_00_model_states.pt         DeepSpeed's own files (fine-tuning: state.pt)
        bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt
        _ranks/rank<r>.json                what rank r wrote: names, bytes, sha256, run id
    latest                                 the commit pointer: {"tag": "step-00000040", ...}

The protocol (`write_rank_record`, `commit`): every rank uploads its own files
and then its rank record; rank 0 writes ``latest`` only after every rank's
record is there and every listed object has the recorded size, then prunes
older checkpoints beyond ``keep``. A checkpoint interrupted anywhere is never
named by ``latest``, so ``resume=auto`` never picks it. Pretraining
(`CheckpointWriter`) and fine-tuning (`launch.evaluation.finetune`) both use it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from launch.config import ConfigError
from pipeline.storage import put_atomic, read_bytes, redact_url, retrying, sha256_file, url_to_fs, write_bytes_atomic

log = logging.getLogger("launch.training.checkpoint")
LATEST = "latest"
RANKS_DIR = "_ranks"
STEP_PREFIX = "step-"


def tag_for(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


@dataclass(frozen=True)
class Committed:
    """A complete checkpoint: where its folder is and what ``latest`` (or its rank records) say of it."""

    url: str
    """The checkpoint folder holding ``<tag>/`` (and ``latest``)."""
    tag: str
    step: int
    world_size: int
    zero_stage: int
    run_id: str


# -- the commit protocol ----------------------------------------------------------------------


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be used as asked (named in the message): exit code 2."""


def rank_records(fs: Any, root: str, tag: str) -> Optional[list[dict[str, Any]]]:
    """The rank records of ``tag``; None when it has none."""
    try:
        paths = retrying(fs.ls)(f"{root}/{tag}/{RANKS_DIR}", detail=False, refresh=True)
    except FileNotFoundError:
        return None
    return [json.loads(read_bytes(fs, p)) for p in paths if p.endswith(".json")]


def write_rank_record(fs: Any, root: str, tag: str, rank: int, world_size: int, run_id: str,
                      files: list[dict[str, Any]], **extra: Any) -> None:
    """Rank ``rank``'s record of ``tag``: written after its files, so its presence means they are complete."""
    record = {"rank": rank, "world_size": world_size, "run_id": run_id, "files": files, **extra}
    write_bytes_atomic(fs, f"{root}/{tag}/{RANKS_DIR}/rank{rank}.json", json.dumps(record, sort_keys=True).encode())


def upload_files(fs: Any, root: str, tag: str, local_paths: list[str]) -> list[dict[str, Any]]:
    """Put each local file under ``<root>/<tag>/`` atomically; their entries for the rank record."""
    files = []
    for path in local_paths:
        name = os.path.basename(path)
        put_atomic(fs, path, f"{root}/{tag}/{name}")
        files.append({"name": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
    return files


def is_complete(fs: Any, root: str, tag: str, run_id: Optional[str]) -> bool:
    """Every rank's record of ``tag`` is there (from ``run_id`` if given) and every object has its size."""
    records = rank_records(fs, root, tag)
    if not records:
        return False
    world = records[0]["world_size"]
    if sorted(r["rank"] for r in records) != list(range(world)):
        return False
    if run_id is not None and any(r["run_id"] != run_id for r in records):
        return False
    for rec in records:
        for f in rec["files"]:
            try:
                if retrying(fs.size)(f"{root}/{tag}/{f['name']}") != f["bytes"]:
                    return False
            except FileNotFoundError:
                return False
    return True


class Abandon:
    """Set when a run stops on an error and gives its checkpoint folder back: a commit in flight then writes
    nothing. A commit that has already begun writing `latest` and pruning finishes first (under the lock), and
    `set` waits for it, within bounds, so that the folder is not given back in the middle of it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.lock = threading.Lock()

    def set(self, wait_s: float = 10.0) -> None:
        self._event.set()
        if self.lock.acquire(timeout=wait_s):
            self.lock.release()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


def commit(fs: Any, root: str, tag: str, run_id: str, pointer: dict[str, Any], keep: int,
           timeout_s: float = 3600.0, abandoned: Optional[Abandon] = None) -> bool:
    """Rank 0: wait until ``tag`` is complete, write ``latest`` naming it, prune beyond ``keep``.

    Returns False (nothing committed) when not every rank finished within ``timeout_s``, or when ``abandoned``
    is set before the writing begins (the run stopped and gave its folder back)."""
    deadline = time.time() + timeout_s
    delay = 0.05
    stopped = abandoned or Abandon()
    while not is_complete(fs, root, tag, run_id):
        if time.time() > deadline:
            log.error("checkpoint %s not committed: not every rank finished its upload in %.0fs", tag, timeout_s)
            return False
        if stopped.wait(delay):
            break
        delay = min(delay * 2, 5.0)
    with stopped.lock:
        if stopped.is_set():
            log.warning("checkpoint %s not committed: the run stopped before it was", tag)
            return False
        body = {**pointer, "tag": tag, "run_id": run_id,
                "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_bytes_atomic(fs, f"{root}/{LATEST}", json.dumps(body, sort_keys=True).encode())
        prune(fs, root, tag, keep)
    return True


def tags(fs: Any, root: str, prefix: str = STEP_PREFIX) -> list[str]:
    """Checkpoint folders under ``root`` (committed or not), oldest first."""
    try:
        entries = retrying(fs.ls)(root, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries if p.rstrip("/").rsplit("/", 1)[-1].startswith(prefix))


def prune(fs: Any, root: str, newest: str, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints up to ``newest``; drop older ones (and older incomplete ones)."""
    prefix = newest.rstrip("0123456789")
    older = [t for t in tags(fs, root, prefix) if t < newest]
    complete = [t for t in older if is_complete(fs, root, t, None)]
    kept = set(complete[-(keep - 1):]) if keep > 1 else set()
    for t in older:
        if t not in kept:
            retrying(fs.rm)(f"{root}/{t}", recursive=True)


# -- finding and fetching ---------------------------------------------------------------------


def find_latest(url: str, storage_options: Optional[dict[str, Any]] = None) -> Optional[Committed]:
    """The checkpoint ``<url>/latest`` names, verified complete; None when the folder has no ``latest``.

    A ``latest`` that is unreadable, or names a checkpoint whose files are incomplete, is reported with a
    warning naming it, and the newest complete checkpoint in the folder is used instead; with none,
    `CheckpointError`."""
    fs, root = url_to_fs(url, storage_options or {})
    root = root.rstrip("/")
    shown = f"{redact_url(url.rstrip('/'))}/{LATEST}"
    try:
        pointer = json.loads(read_bytes(fs, f"{root}/{LATEST}"))
        tag = pointer["tag"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        return _newest_complete(fs, root, url, f"{shown} is unreadable ({type(err).__name__}: {err})")
    if not is_complete(fs, root, tag, pointer.get("run_id")):
        return _newest_complete(fs, root, url, f"{shown} names {tag}, but its files are incomplete")
    return Committed(url.rstrip("/"), tag, int(pointer.get("step", pointer.get("epoch", 0))),
                     int(pointer["world_size"]), int(pointer.get("zero_stage", 0)), pointer.get("run_id", ""))


def _newest_complete(fs: Any, root: str, url: str, problem: str) -> Committed:
    for tag in reversed(tags(fs, root, STEP_PREFIX) + tags(fs, root, "epoch-")):
        records = rank_records(fs, root, tag)
        if records and is_complete(fs, root, tag, records[0]["run_id"]):
            log.warning("%s; using the newest complete checkpoint, %s", problem, tag)
            r = records[0]
            return Committed(url.rstrip("/"), tag, int(r.get("step", r.get("epoch", 0))), int(r["world_size"]),
                             int(r.get("zero_stage", 0)), r["run_id"])
    raise CheckpointError(f"{problem}, and the folder holds no other complete checkpoint: resume elsewhere, "
                          "or start fresh in another checkpoint.dir")


def find_step(url: str, storage_options: Optional[dict[str, Any]] = None) -> Committed:
    """One checkpoint folder ``<dir>/<tag>`` that every rank completed (FileNotFoundError otherwise)."""
    base, _, tag = url.rstrip("/").rpartition("/")
    fs, root = url_to_fs(base, storage_options or {})
    root = root.rstrip("/")
    records = rank_records(fs, root, tag)
    if not records or not is_complete(fs, root, tag, records[0]["run_id"]):
        raise FileNotFoundError(f"{redact_url(url)}: not a complete checkpoint (no `_ranks` records of every rank)")
    r = records[0]
    return Committed(base, tag, int(r.get("step", 0)), int(r["world_size"]), int(r.get("zero_stage", 0)), r["run_id"])


def resolve(resume: str, checkpoint_dir: Optional[str],
            storage_options: Optional[dict[str, Any]] = None) -> Optional[Committed]:
    """``resume`` = none | auto | <URL of a checkpoint folder or of one of its step folders> → what to load."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(checkpoint_dir, storage_options) if checkpoint_dir else None
    if resume.rstrip("/").rsplit("/", 1)[-1].startswith(STEP_PREFIX):
        return find_step(resume, storage_options)
    found = find_latest(resume, storage_options)
    if found is None:
        raise FileNotFoundError(f"resume={redact_url(resume)}: no committed checkpoint there")
    return found


def fetch(ckpt: Committed, dest: str, storage_options: Optional[dict[str, Any]] = None) -> str:
    """Download every file of ``ckpt`` to ``dest/<tag>``, checking each checksum; returns ``dest``."""
    fs, root = url_to_fs(ckpt.url, storage_options or {})
    root = root.rstrip("/")
    local = os.path.join(dest, ckpt.tag)
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local, exist_ok=True)
    records = rank_records(fs, root, ckpt.tag)
    if not records or len(records) != records[0]["world_size"]:
        raise CheckpointError(f"{redact_url(ckpt.url)}/{ckpt.tag}: its rank records are missing (found "
                              f"{len(records or [])}); it was never complete and is not loaded")
    for rec in records:
        for f in rec["files"]:
            path = os.path.join(local, f["name"])
            retrying(fs.get_file)(f"{root}/{ckpt.tag}/{f['name']}", path)
            if sha256_file(path) != f["sha256"]:
                raise RuntimeError(f"{ckpt.tag}/{f['name']}: checksum mismatch after download")
    return dest


def discard_uncommitted(url: str, storage_options: Optional[dict[str, Any]], newer_than: Optional[str],
                        prefix: str = STEP_PREFIX) -> None:
    """Remove checkpoint folders a crashed run left behind after the last commit (rank 0, at start)."""
    fs, root = url_to_fs(url, storage_options or {})
    root = root.rstrip("/")
    for t in tags(fs, root, prefix):
        if newer_than is None or t > newer_than:
            log.warning("removing uncommitted checkpoint %s left by an interrupted run", t)
            retrying(fs.rm)(f"{root}/{t}", recursive=True)


def new_run_id() -> str:
    return uuid.uuid4().hex


# -- the training run's writer ----------------------------------------------------------------


class CheckpointWriter:
    """Saves DeepSpeed checkpoints of one rank: staged locally, uploaded in the background, committed by rank 0.

    Every rank calls DeepSpeed's ``save_checkpoint`` into its *own* local staging
    folder, so the files a rank wrote are exactly the files it uploads; uploads run
    in a background thread while training continues.
    """

    def __init__(self, url: str, staging: str, rank: int, world_size: int, keep: int, run_id: str,
                 storage_options: Optional[dict[str, Any]] = None, commit_timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url, dict(storage_options or {}))
        self.root = root.rstrip("/")
        self.staging = staging
        self.rank, self.world_size, self.keep, self.run_id = rank, world_size, keep, run_id
        self.commit_timeout_s = commit_timeout_s
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._abandoned = Abandon()

    def abandon(self) -> None:
        """The run is stopping on an error and gives its folder back: an upload in flight commits nothing (a
        checkpoint every rank had finished may be lost; the one committed before stays the latest). A commit
        already writing is waited for (at most 10 s)."""
        self._abandoned.set()

    def save(self, engine: Any, step: int, client_state: dict[str, Any], zero_stage: int) -> float:
        """Write this rank's part of the checkpoint locally and start uploading it; returns the seconds
        training was stalled (the local write and the wait for the previous upload)."""
        t0 = time.time()
        self.wait()  # one upload in flight per rank; commits stay in step order
        tag = tag_for(step)
        local_root = os.path.join(self.staging, f"rank{self.rank}")
        local = os.path.join(local_root, tag)
        shutil.rmtree(local, ignore_errors=True)
        engine.save_checkpoint(local_root, tag=tag, client_state=client_state, save_latest=False)
        stall = time.time() - t0
        self._thread = threading.Thread(target=self._upload, args=(local, tag, step, zero_stage),
                                        name=f"ckpt-upload-{tag}", daemon=True)
        self._thread.start()
        return stall

    def _upload(self, local: str, tag: str, step: int, zero_stage: int) -> None:
        try:
            paths = [os.path.join(local, n) for n in sorted(os.listdir(local)) if os.path.isfile(os.path.join(local, n))]
            files = upload_files(self.fs, self.root, tag, paths)
            write_rank_record(self.fs, self.root, tag, self.rank, self.world_size, self.run_id, files,
                              step=step, zero_stage=zero_stage)
            shutil.rmtree(local, ignore_errors=True)
            if self.rank == 0:
                pointer = {"step": step, "world_size": self.world_size, "zero_stage": zero_stage}
                if commit(self.fs, self.root, tag, self.run_id, pointer, self.keep, self.commit_timeout_s,
                          self._abandoned):
                    log.info("checkpoint %s committed to %s", tag, redact_url(self.url))
        except BaseException as err:  # noqa: BLE001 - reported by wait() on the training thread
            self._error = err

    def wait(self) -> None:
        """Block until this rank's upload (and, on rank 0, the commit) has finished; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload failed: {type(err).__name__}: {err}") from err

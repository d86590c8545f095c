"""DeepSpeed checkpoints in object storage: staged locally, uploaded by each rank, committed last.

Layout under ``checkpoint.dir`` (any fsspec URL)::

    step-00000040/                         one folder per checkpoint (DeepSpeed's own files)
        mp_rank_00_model_states.pt         model + client state (loader position, config, ...)
        bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt   one per rank (ZeRO partitions)
        _ranks/rank<r>.json                what rank r uploaded: names, bytes, sha256, run id
    latest                                 the commit pointer: {"tag": "step-00000040", ...}
    encoder.safetensors, encoder_config.json   the exported encoder (end of training)

Saving: every rank calls DeepSpeed's ``save_checkpoint`` into its *own* local
staging folder, so the files a rank wrote are exactly the files it uploads.
Uploads run in a background thread while training continues. Rank 0 commits
the step (writes ``latest``) only after every rank's ``_ranks`` record is there
and every listed object has the recorded size; then it deletes checkpoints
beyond ``keep``. A checkpoint interrupted anywhere is never named by
``latest``, so ``resume=auto`` never picks it.
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

from pipeline.storage import (
    put_atomic,
    read_bytes,
    redact_url,
    retrying,
    sha256_file,
    url_to_fs,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)
LATEST = "latest"
RANKS_DIR = "_ranks"
# Environment hook for the fault-injection test: "kill-during-upload:<step>:<rank>".
FAULT_ENV = "FUSMAE_FAULT"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class Committed:
    tag: str
    step: int
    world_size: int
    zero_stage: int
    run_id: str


def _fault(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    return spec == f"{kind}:{step}:{rank}"


class CheckpointStore:
    """Save, commit, find and fetch DeepSpeed checkpoints under one fsspec URL."""

    def __init__(self, url: str, staging: str, rank: int, world_size: int, keep: int,
                 storage_options: Optional[dict[str, Any]] = None, commit_timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = url_to_fs(self.url, self.storage_options)
        self.staging = staging
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.commit_timeout_s = commit_timeout_s
        self.run_id = ""
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_committed: Optional[str] = None

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict[str, Any], zero_stage: int) -> float:
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
            files = []
            names = sorted(os.listdir(local))
            for i, name in enumerate(names):
                path = os.path.join(local, name)
                if not os.path.isfile(path):
                    continue
                if i == len(names) // 2 and _fault("kill-during-upload", step, self.rank):
                    log.error("fault injection: rank %d exits during the upload of %s", self.rank, tag)
                    os._exit(17)
                put_atomic(self.fs, path, f"{self.root}/{tag}/{name}")
                files.append({"name": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
            record = {"rank": self.rank, "world_size": self.world_size, "step": step, "run_id": self.run_id,
                      "zero_stage": zero_stage, "files": files}
            write_bytes_atomic(self.fs, f"{self.root}/{tag}/{RANKS_DIR}/rank{self.rank}.json",
                               json.dumps(record, sort_keys=True).encode())
            shutil.rmtree(local, ignore_errors=True)
            if self.rank == 0:
                self._commit(tag, step, zero_stage)
        except BaseException as err:  # noqa: BLE001 - reported by wait() on the training thread
            self._error = err

    def _complete(self, tag: str, run_id: Optional[str]) -> bool:
        """Every rank's record of ``tag`` is there (from ``run_id`` if given) and every object has its size."""
        records = self._rank_records(tag)
        if records is None or len(records) == 0:
            return False
        world = records[0]["world_size"]
        if sorted(r["rank"] for r in records) != list(range(world)):
            return False
        if run_id is not None and any(r["run_id"] != run_id for r in records):
            return False
        for rec in records:
            for f in rec["files"]:
                try:
                    if self.fs.size(f"{self.root}/{tag}/{f['name']}") != f["bytes"]:
                        return False
                except FileNotFoundError:
                    return False
        return True

    def _rank_records(self, tag: str) -> Optional[list[dict[str, Any]]]:
        try:
            paths = self.fs.ls(f"{self.root}/{tag}/{RANKS_DIR}", detail=False, refresh=True)
        except FileNotFoundError:
            return None
        return [json.loads(read_bytes(self.fs, p)) for p in paths if p.endswith(".json")]

    def _commit(self, tag: str, step: int, zero_stage: int) -> None:
        deadline = time.time() + self.commit_timeout_s
        delay = 0.05
        while not self._complete(tag, self.run_id):
            if time.time() > deadline:
                log.error("checkpoint %s not committed: not every rank finished its upload in %.0fs",
                          tag, self.commit_timeout_s)
                return
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        pointer = {"tag": tag, "step": step, "world_size": self.world_size, "zero_stage": zero_stage,
                   "run_id": self.run_id, "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_bytes_atomic(self.fs, f"{self.root}/{LATEST}", json.dumps(pointer, sort_keys=True).encode())
        self.last_committed = tag
        log.info("checkpoint %s committed to %s", tag, redact_url(self.url))
        self._prune(tag)

    def _prune(self, newest: str) -> None:
        """Keep the ``keep`` newest committed checkpoints; drop older ones (and older incomplete ones)."""
        tags = self.tags()
        older = [t for t in tags if t < newest]
        complete = [t for t in older if self._complete(t, None)]
        keep = set(complete[-(self.keep - 1):]) if self.keep > 1 else set()
        for t in older:
            if t not in keep:
                retrying(self.fs.rm)(f"{self.root}/{t}", recursive=True)

    def wait(self) -> None:
        """Block until this rank's upload (and, on rank 0, the commit) has finished; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload failed: {type(err).__name__}: {err}") from err

    # ---------------------------------------------------------------- resume
    def tags(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in entries if p.rsplit("/", 1)[-1].startswith("step-"))

    def latest(self) -> Optional[Committed]:
        """The committed checkpoint named by ``latest``, verified complete; None if there is none."""
        try:
            pointer = json.loads(read_bytes(self.fs, f"{self.root}/{LATEST}"))
        except FileNotFoundError:
            return None
        tag = pointer["tag"]
        if not self._complete(tag, pointer.get("run_id")):
            raise RuntimeError(f"{redact_url(self.url)}/{LATEST} names {tag}, but its files are incomplete")
        return Committed(tag, pointer["step"], pointer["world_size"], pointer["zero_stage"], pointer.get("run_id", ""))

    def resolve(self, resume: str) -> Optional[tuple["CheckpointStore", Committed]]:
        """``resume`` = none | auto | <checkpoint URL> → the store and committed checkpoint to load."""
        if resume == "none":
            return None
        if resume == "auto":
            found = self.latest()
            return (self, found) if found else None
        # an explicit URL: a checkpoint folder (…/step-N) or a checkpoint.dir with a `latest`
        url = resume.rstrip("/")
        base, _, last = url.rpartition("/")
        if last.startswith("step-"):
            store = CheckpointStore(base, self.staging, self.rank, self.world_size, self.keep, self.storage_options)
            records = store._rank_records(last)
            if not records or not store._complete(last, records[0]["run_id"]):
                raise FileNotFoundError(f"resume={redact_url(resume)}: not a complete checkpoint")
            r = records[0]
            return store, Committed(last, r["step"], r["world_size"], r["zero_stage"], r["run_id"])
        store = CheckpointStore(url, self.staging, self.rank, self.world_size, self.keep, self.storage_options)
        found = store.latest()
        if found is None:
            raise FileNotFoundError(f"resume={redact_url(resume)}: no committed checkpoint there")
        return store, found

    def fetch(self, ckpt: Committed, dest: str) -> str:
        """Download every file of ``ckpt`` to ``dest/<tag>``, checking each checksum; returns ``dest``."""
        local = os.path.join(dest, ckpt.tag)
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local, exist_ok=True)
        for rec in self._rank_records(ckpt.tag) or []:
            for f in rec["files"]:
                path = os.path.join(local, f["name"])
                retrying(self.fs.get_file)(f"{self.root}/{ckpt.tag}/{f['name']}", path)
                if sha256_file(path) != f["sha256"]:
                    raise RuntimeError(f"{ckpt.tag}/{f['name']}: checksum mismatch after download")
        return dest

    def discard_uncommitted(self, newer_than: Optional[str]) -> None:
        """Remove checkpoint folders a crashed run left behind after the last commit (rank 0, at start)."""
        for t in self.tags():
            if newer_than is None or t > newer_than:
                log.warning("removing uncommitted checkpoint %s left by an interrupted run", t)
                retrying(self.fs.rm)(f"{self.root}/{t}", recursive=True)

    @staticmethod
    def new_run_id() -> str:
        return uuid.uuid4().hex

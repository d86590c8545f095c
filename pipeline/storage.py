"""fsspec access to every location the project reads or writes, with retries and redaction.

Every location is an fsspec URL (local path, file://, s3://, gs://, memory://).
Credentials come from the filesystem's own chain (for S3: AWS_* variables,
profiles, instance roles), or from ``storage_options``; they are never written
to logs, manifests or checkpoints: everything that records an invocation goes
through `redact`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from typing import Any, Callable, Iterable, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Keys whose values are secrets wherever they appear (storage_options, configs, argv).
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|session|private|api[_-]?key|^key$|access[_-]?key)", re.I)
# --flag value pairs in argv whose value is a secret.
_SECRET_FLAG = re.compile(r"^--?[\w-]*(secret|password|token|credential|key)[\w-]*$", re.I)
REDACTED = "***"


def redact_url(url: str) -> str:
    """Remove user:password@ from a URL, keep the rest."""
    if "@" not in url or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with secret values replaced by ``***``.

    A value is secret when its key looks like a credential (``key``, ``secret``,
    ``token``, ``aws_secret_access_key``, ...); URLs lose embedded ``user:pass@``.
    A ``--storage-options`` JSON string is parsed and redacted too.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "", {}):
                out[k] = REDACTED if not isinstance(v, dict) else redact(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        s = obj.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                import json

                return json.dumps(redact(json.loads(s)), sort_keys=True)
            except ValueError:
                pass
        return redact_url(obj)
    return obj


def redact_argv(argv: Iterable[str]) -> list[str]:
    """Redact a command line: values after secret-looking flags, JSON options, URL credentials."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if "=" in arg and arg.startswith("-"):
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={REDACTED}" if _SECRET_FLAG.match(flag) else f"{flag}={redact(value)}")
            continue
        if _SECRET_FLAG.match(arg):
            hide_next = True
        out.append(redact(arg))
    return out


def _is_transient(err: BaseException) -> bool:
    """Errors worth retrying: network hiccups, throttling, 5xx; not missing files or bad requests."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return any(
        s in text
        for s in ("timeout", "timed out", "connection", "throttl", "slowdown", "slow down", "503", "500",
                  "internal error", "service unavailable", "reset by peer", "temporarily")
    )


def retrying(fn: Callable[..., T], attempts: int = 5) -> Callable[..., T]:
    """Wrap a storage call so transient errors are retried with exponential back-off."""
    return retry(
        retry=retry_if_exception(_is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.2, max=10),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )(fn)


def url_to_fs(url: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for ``url``."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def join(base: str, *parts: str) -> str:
    """Join URL or path components with '/' (fsspec paths use '/' everywhere)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_remote(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb", block_size=chunk) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def put_atomic(fs: fsspec.AbstractFileSystem, local_path: str, dest: str) -> None:
    """Publish a local file at ``dest`` so that no reader ever sees it half-written.

    On a local filesystem: copy to a hidden temporary name beside ``dest``, then
    rename (atomic within one filesystem). On object stores a PUT (single or
    multipart) only becomes visible once complete, so the upload goes straight
    to ``dest``.
    """
    parent = dest.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp"
        try:
            fs.put_file(local_path, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        retrying(fs.put_file)(local_path, dest)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, dest: str, data: bytes) -> None:
    """Write small metadata files (manifest, pointers) atomically, with retries."""
    parent = dest.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        retrying(fs.pipe_file)(dest, data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return retrying(fs.cat_file)(path)


def check_writable(fs: fsspec.AbstractFileSystem, base: str) -> None:
    """Fail early and clearly when the output location cannot be written."""
    probe = join(base, f".write-probe-{uuid.uuid4().hex}")
    try:
        if is_local(fs):
            os.makedirs(base, exist_ok=True)
        write_bytes_atomic(fs, probe, b"")
        fs.rm_file(probe)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot write"
        raise PermissionError(f"output location is not writable: {redact_url(base)} ({type(err).__name__}: {err})") from err

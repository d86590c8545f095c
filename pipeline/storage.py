"""fsspec access to every location the project reads or writes, with retries and redaction.

Every location is an fsspec URL (local path, file://, s3://, gs://, memory://).
Credentials come from the filesystem's own chain (for S3: AWS_* variables,
profiles, instance roles), or from ``storage_options``; they are never written
to logs, manifests or checkpoints: everything that records an invocation goes
through `redact`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import time
import uuid
from typing import Any, Callable, Iterable, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")

# Keys whose values are secrets wherever they appear (storage_options, configs, argv).
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|session|private|api[_-]?key|^key$|access[_-]?key)", re.I)
# --flag value pairs in argv whose value is a secret.
_SECRET_FLAG = re.compile(r"^--?[\w-]*(secret|password|token|credential|key)[\w-]*$", re.I)
REDACTED = "***"


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")


def redact_url(url: str) -> str:
    """Remove ``user:password@`` from every URL in ``url`` (a URL, a path, or a message holding some)."""
    if "@" not in url:
        return url
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", url)


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


RETRY_WINDOW_ENV = "FUSMAE_RETRY_WINDOW_S"
DEFAULT_RETRY_WINDOW_S = 900.0
"""How long a storage call keeps retrying transient errors before the run stops (15 minutes)."""


class StorageUnavailable(RuntimeError):
    """The store kept failing with transient errors for the whole retry window: the run stops (nothing skipped)."""


class ReadAbandoned(RuntimeError):
    """A read ahead given up because its reader stopped (never transient: no retry follows)."""


def retry_window_s() -> float:
    """The retry window in force: `set_retry_window`, else ``$FUSMAE_RETRY_WINDOW_S``, else 900 s."""
    try:
        return float(os.environ.get(RETRY_WINDOW_ENV, DEFAULT_RETRY_WINDOW_S))
    except ValueError:
        return DEFAULT_RETRY_WINDOW_S


def set_retry_window(seconds: float) -> None:
    """Set the window for this process and every process it starts (loader workers, ranks, Ray tasks read it)."""
    if seconds < 0:
        raise ValueError(f"the retry window must be >= 0 s, got {seconds}")
    os.environ[RETRY_WINDOW_ENV] = repr(float(seconds))


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of ``path``, fewer where it ends first, none where it ends before ``start``: what a local
    file's read gives. S3 answers a range that begins past the end with 416 InvalidRange, which s3fs raises as an
    OSError (EINVAL) caused by botocore's ClientError; that one error, and only it, is read as no bytes, so that a
    member or entry past the end of an object cut short is judged by its length, as locally. (Other stores' 416,
    gcsfs's or HTTP's, is still raised: judged as unreadable, with the store's words.)"""
    try:
        return fs.cat_file(path, start=start, end=end)
    except OSError as err:
        response = getattr(err.__cause__, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "InvalidRange":
            return b""
        raise


def is_transient(err: BaseException) -> bool:
    """Errors worth retrying: network trouble, timeouts, throttling (503 SlowDown), 5xx.

    Not missing objects, bad requests, refused credentials, or content problems."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
                        StorageUnavailable)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return any(
        s in text
        for s in ("timeout", "timed out", "connection", "throttl", "slowdown", "slow down", "503", "500", "502",
                  "504", "internal error", "service unavailable", "bad gateway", "reset by peer", "temporarily",
                  "server disconnected", "broken pipe", "endpoint url", "could not connect",
                  # a response cut in the middle of its body (aiohttp's ClientPayloadError "Response payload is
                  # not completed", botocore's ResponseStreamingError / IncompleteReadError, http.client's
                  # IncompleteRead): the transfer failed, not the object
                  "payload is not completed", "not enough data to satisfy content length", "incompleteread",
                  "responsestreamingerror")
    )


def _entering(state: RetryCallState) -> None:
    if state.attempt_number == 1:
        err = state.outcome.exception() if state.outcome else None
        log.warning("storage: %s failed (%s); retrying for up to %.0f s", _name(state.fn),
                    redact_url(f"{type(err).__name__}: {err}"), retry_window_s())


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap a storage call so transient errors are retried with jittered exponential back-off for up to the
    retry window (`retry_window_s`); a log line when the window is entered and one when it is left. After the
    window: `StorageUnavailable` naming the call and the last error. Other errors propagate at once."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        t0 = time.monotonic()
        retryer = Retrying(retry=retry_if_exception(is_transient), stop=stop_after_delay(retry_window_s()),
                           wait=wait_random_exponential(multiplier=0.2, max=20), before_sleep=_entering)
        try:
            result = retryer(fn, *args, **kwargs)
        except RetryError as err:
            last = err.last_attempt.exception()
            where = redact_url(" ".join(str(a) for a in args[:1]))
            raise StorageUnavailable(
                f"storage unreachable for {time.monotonic() - t0:.0f} s (the retry window is {retry_window_s():.0f} s;"
                f" {RETRY_WINDOW_ENV} or the storage settings change it): {_name(fn)} {where}: "
                f"{redact_url(f'{type(last).__name__}: {last}')}") from last
        attempts = retryer.statistics.get("attempt_number", 1)
        if attempts > 1:
            log.warning("storage: %s succeeded again after %d attempts in %.1f s", _name(fn), attempts,
                        time.monotonic() - t0)
        return result

    return call


class RetryingFile(io.RawIOBase):
    """A read-only, seekable file over ``fs.open(path, "rb", **options)`` whose opening and every read outlast
    transient storage errors (`retrying`): each attempt seeks back to where the read began, so a read that
    failed part-way is never half-counted. What reads through it (a tar walk, a zip directory, zarr chunks)
    sees either the bytes or, after the retry window, `StorageUnavailable`, never a transient error it would
    take for damaged content."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, **options: Any):
        super().__init__()
        self.name = path
        self._f = retrying(fs.open)(path, "rb", **options)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._f.seek(offset, whence)  # fsspec and local files seek without I/O
        return self._pos

    def read(self, size: Optional[int] = -1) -> bytes:
        data = retrying(self._read_at)(self.name, self._pos, size)  # the error names the path
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = retrying(self._readinto_at)(self.name, self._pos, buffer)
        self._pos += n
        return n

    def _read_at(self, _path: str, pos: int, size: Optional[int]) -> bytes:
        self._f.seek(pos)
        return self._f.read(-1 if size is None else size)

    def _readinto_at(self, _path: str, pos: int, buffer: Any) -> int:
        self._f.seek(pos)
        return self._f.readinto(buffer) or 0

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


CREDENTIALS_IN_URL = ("credentials inside a URL are not used (and would be printed by the tools on the way); give "
                      "them through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), a profile, or "
                      "storage options")


class CredentialsInURL(ValueError):
    """A URL with ``user:password@`` where the store takes credentials another way."""


def url_to_fs(url: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for ``url``; a URL carrying credentials is refused (named redacted)."""
    if redact_url(url) != url and not url.startswith(("http://", "https://")):
        raise CredentialsInURL(f"{redact_url(url)}: {CREDENTIALS_IN_URL}")
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        options = with_inner_retries(options)
    return fsspec.core.url_to_fs(url, **options)


S3_INNER_RETRIES = {"mode": "standard", "max_attempts": 3}
"""botocore's own retries under every S3 call: a short, bounded layer for blips (at most 2 retries of at most
1 + 2 s back-off, botocore's standard mode). Its default (legacy mode, 5 attempts, up to 15 s) multiplied by
s3fs's 5 attempts hid outages of up to ~77 s without a word; bounded, anything longer than ~17 s reaches
`retrying`, which logs it and owns the window. Storage options that set ``config_kwargs.retries`` win."""


def with_inner_retries(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with botocore's retry settings defaulted to `S3_INNER_RETRIES` (a user's own are kept)."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_INNER_RETRIES))
    return {**options, "config_kwargs": config}


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
    """sha256 of a stored file, read in ``chunk``-byte pieces; each read outlasts transient errors (`RetryingFile`)."""
    h = hashlib.sha256()
    with RetryingFile(fs, path, block_size=chunk) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


UPLOAD_PART_BYTES = 8 << 20
"""Part size of a multipart upload to S3: boto3's and the AWS CLI's default (``TransferConfig``: multipart_chunksize
8 MB), within S3's guidance for part and range sizes (8-16 MB); the loader's 16 MiB ranged reads
(`launch.data.reader`) fall on part boundaries. s3fs's own default, 50 MiB parts read 10 at a time (its
``max_concurrency``, which stays s3fs's, or the user's in ``--storage-options``), held ~1 GiB in memory for a
512 MiB shard, per worker (bench/bench_upload.py)."""
MAX_UPLOAD_PARTS = 10_000
"""S3's limit of parts per upload: past 10,000 x 8 MiB (~78 GiB) the parts grow to fit."""


def upload_options(fs: fsspec.AbstractFileSystem, size: int) -> dict[str, Any]:
    """``put_file`` options for a file of ``size`` bytes: the part size on S3 (`UPLOAD_PART_BYTES`), none elsewhere
    (other stores take their own)."""
    try:
        from s3fs import S3FileSystem
    except ImportError:  # pragma: no cover - s3fs is a dependency
        return {}
    if not isinstance(fs, S3FileSystem):
        return {}
    return {"chunksize": max(UPLOAD_PART_BYTES, -(-size // MAX_UPLOAD_PARTS))}


def put_atomic(fs: fsspec.AbstractFileSystem, local_path: str, dest: str) -> None:
    """Publish a local file at ``dest`` so that no reader ever sees it half-written.

    On a local filesystem: copy to a hidden temporary name beside ``dest``, then
    rename (atomic within one filesystem). On object stores a PUT (single or
    multipart) only becomes visible once complete, so the upload goes straight
    to ``dest``, on S3 in parts of `UPLOAD_PART_BYTES`.
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
        retrying(fs.put_file)(local_path, dest, **upload_options(fs, os.path.getsize(local_path)))


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, dest: str, data: bytes, durable: bool = True) -> None:
    """Write small metadata files (manifest, pointers) atomically, with retries.

    ``durable``: on a local file system, fsync before the rename, so that the file survives a power cut
    whole. False for files whose loss or tearing a rerun detects and repairs (shard progress records): an
    fsync there would also flush the shard just written (ext4 commits pending data with the journal)."""
    parent = dest.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        retrying(fs.pipe_file)(dest, data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return retrying(fs.cat_file)(path)


def check_writable(fs: fsspec.AbstractFileSystem, base: str, url: Optional[str] = None) -> None:
    """Fail early and clearly when the output location cannot be written (``url``: how the user named it)."""
    probe = join(base, f".write-probe-{uuid.uuid4().hex}")
    try:
        if is_local(fs):
            os.makedirs(base, exist_ok=True)
        write_bytes_atomic(fs, probe, b"")
        retrying(fs.rm_file)(probe)
    except StorageUnavailable:  # an outage longer than the retry window: not a refusal, the run stops as for one
        raise
    except Exception as err:  # noqa: BLE001 - any other failure here means "cannot write"
        hint = ("; check the credentials (environment, profile or storage options)"
                if isinstance(err, PermissionError) and not is_local(fs) else "")
        raise PermissionError(f"output location is not writable: {redact_url(url or base)} "
                              f"({type(err).__name__}: {err}){hint}") from err

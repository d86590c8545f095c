"""One writer per output: a lease file taken before any write, kept fresh by a heartbeat, released at the end.

``<root>/_lease.json`` holds {owner, host, pid, what, started, heartbeat} (times in
seconds since the epoch). Taking it uses the store's atomic create: an exclusive
create on file systems, a conditional PUT (``If-None-Match: *``) on S3, so two
writers starting at the same moment cannot both win. A lease held by another run
is refused with an error naming its owner, unless its heartbeat is older than
``stale_after_s`` (its owner died), its process is gone (same host), or the
caller forces a takeover. The holder
refreshes the heartbeat every ``stale_after_s / 4`` seconds from a thread; on S3 each
refresh is a conditional PUT (``If-Match`` the ETag of the holder's last write), so a
heartbeat held up by an outage and retried after another run took the lease over fails
instead of overwriting the new holder's lease (the holder then stops, saying so).

Used by preprocessing (one lease per split output) and by training (one per
``checkpoint.dir``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from pipeline.storage import (StorageUnavailable, is_local, read_bytes, redact_url, retry_window_s, retrying,
                              url_to_fs, write_bytes_atomic)

log = logging.getLogger("pipeline.lease")
LEASE = "_lease.json"
DEFAULT_STALE_AFTER_S = 300.0
"""A lease whose heartbeat is older than this (5 minutes) belongs to a run that died."""


class LeaseHeld(RuntimeError):
    """Another live run writes to this output."""


class Lease:
    """The lease of one output folder (an fsspec URL); a context manager that takes and releases it."""

    def __init__(self, url: str, what: str, storage_options: Optional[dict[str, Any]] = None,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, force: bool = False, owner: Optional[str] = None):
        self.url, self.what, self.force = url.rstrip("/"), what, force
        self.fs, root = url_to_fs(self.url, dict(storage_options or {}))
        self.path = f"{root.rstrip('/')}/{LEASE}"
        self.stale_after_s = stale_after_s
        self.owner = owner or uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._held = False
        self._etag: Optional[str] = None
        """S3: the ETag of this lease's last write, the condition of the next heartbeat's PUT."""

    # -- taking -----------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Take the lease (see the module docstring); raises `LeaseHeld` naming the holder."""
        if self._held:
            raise RuntimeError(f"the lease of {redact_url(self.url)} is already held by this Lease")
        self._stop.clear()  # a Lease released earlier may be taken again
        self._etag = None
        try:
            self._take()
            self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
            self._thread.start()
            self._held = True
        except LeaseHeld:
            raise
        except BaseException:  # SIGTERM, Ctrl-C or an error after our create may have landed: the caller never
            self._stop.set()  # gets this Lease, so it is removed here if it is ours (one quick attempt)
            self._thread = None
            self._remove_if_ours_quickly(quiet=True)
            raise
        return self

    def _take(self) -> None:
        for _ in range(3):
            if self._create():
                return
            held = self.holder()
            if held is None:  # released between our attempt and the read: try again
                continue
            if held.get("owner") == self.owner:  # our own create landed, its reply was lost and the retry refused
                return
            age = time.time() - float(held.get("heartbeat", 0))
            if not self.force and age <= self.stale_after_s and not _dead_here(held):
                raise LeaseHeld(
                    f"{redact_url(self.url)} is being written by another run ({held.get('what', '?')} on "
                    f"{held.get('host', '?')}, pid {held.get('pid', '?')}, owner {held.get('owner', '?')[:12]}, "
                    f"started {_when(held.get('started'))}, heartbeat {age:.0f} s ago). Wait for it, write "
                    f"elsewhere, or take over (--force / checkpoint.force_lease=true) if it is gone; a lease "
                    f"older than {self.stale_after_s:.0f} s is taken over by itself.")
            why = ("forced" if self.force else "its process is gone" if _dead_here(held)
                   else f"stale: heartbeat {age:.0f} s ago")
            log.warning("taking over the lease of %s from owner %s (%s)", redact_url(self.url),
                        str(held.get("owner", "?"))[:12], why)
            retrying(self.fs.rm_file)(self.path)
        raise LeaseHeld(f"{redact_url(self.url)}: could not take the lease (others keep taking it)")

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                           "started": self.started, "heartbeat": time.time()}, sort_keys=True).encode()

    def _create(self) -> bool:
        """Atomically create the lease file; False when it exists."""
        data = self._body()
        if is_local(self.fs):
            # Written whole under a private name, then hard-linked into place: the link fails when the lease
            # exists, and a reader never sees an empty lease (which would count as stale and be taken over).
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{self.owner}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            self._etag = _etag(retrying(self.fs.pipe_file)(self.path, data, mode="create"))
        except (FileExistsError, OSError) as err:  # S3 answers 412 PreconditionFailed when it exists
            if isinstance(err, FileExistsError) or retrying(self.fs.exists)(self.path):
                return False
            raise
        return True

    def _refresh(self) -> bool:
        """Write a fresh heartbeat if the lease is still this run's; False when another run holds it (or none)."""
        if "s3" not in _protocols(self.fs):
            # A file system (or a store without conditional writes here): read, then replace; the window between
            # the two is that of one call.
            held = self.holder()
            if held is None or held.get("owner") != self.owner:
                return False
            write_bytes_atomic(self.fs, self.path, self._body())
            return True
        if self._etag is None:  # our create's reply was lost: the lease as stored and its ETag, in one read
            held, self._etag = retrying(self._read_s3)()
            if held is None or held.get("owner") != self.owner:
                return False
        try:
            self._etag = _etag(retrying(self.fs.pipe_file)(self.path, self._body(), IfMatch=self._etag))
            return True
        except FileNotFoundError:  # removed (a takeover between its delete and its create)
            return False
        except OSError as err:
            if not _precondition_failed(err):
                raise  # refused, unsupported, ...: `_beat` says so, and the heartbeat is not taken for written
            # Another write since ours: a takeover, or our own earlier attempt whose reply was lost
            held, etag = retrying(self._read_s3)()
            if held is None or held.get("owner") != self.owner:
                return False
            self._etag = etag
            return True

    def _read_s3(self) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """The stored lease and its ETag from one GET (no listing cache, no window between the two)."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, Optional[str]]:
            bucket, key, _ = self.fs.split_path(self.path)
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp.get("ETag")
            finally:
                resp["Body"].close()

        try:
            body, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(body), etag
        except ValueError:
            return {"owner": "?", "heartbeat": 0}, etag

    def holder(self) -> Optional[dict[str, Any]]:
        """The lease as stored; None when there is none (an unreadable one counts as stale)."""
        try:
            return json.loads(read_bytes(self.fs, self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": "?", "heartbeat": 0}

    # -- keeping and releasing --------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                if not self._refresh():
                    held = self.holder()
                    log.error("the lease of %s was taken over by owner %s: this run no longer owns its output",
                              redact_url(self.url), None if held is None else str(held.get("owner"))[:12])
                    return
            except Exception as err:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                log.warning("lease heartbeat for %s failed: %s", redact_url(self.url), err)

    def owns(self) -> bool:
        held = self.holder()
        return held is not None and held.get("owner") == self.owner

    def release(self, patient: bool = True) -> None:
        """Stop the heartbeat and remove the lease if it is still ours.

        ``patient``: storage calls wait out transient errors for the retry window. A run that is already
        stopping on an outage that outlasted the window (`StorageUnavailable`) releases with one attempt
        instead: where it fails, the lease stays behind and the next run takes it over (its process is
        gone, or its heartbeat goes stale), and the error the run stops on is the one reported."""
        self._stop.set()
        if not self._held:
            return
        if self._thread is not None:
            # Patient: a heartbeat still retrying its write (for up to the window) must not put the lease back
            # after it is removed; it is waited for, within bounds.
            self._thread.join(timeout=retry_window_s() + 30 if patient else 5)
            self._thread = None
        if patient:
            if self.owns():
                retrying(self.fs.rm_file)(self.path)
        else:
            self._remove_if_ours_quickly()
        self._held = False  # not reached when a patient release fails: a quick attempt may follow

    def _remove_if_ours_quickly(self, quiet: bool = False) -> None:
        """One attempt, no retry window: read the lease, remove it if it is ours. Failures are logged (``quiet``:
        at debug level, for a lease this run may never have created), never raised."""
        try:
            held = json.loads(self.fs.cat_file(self.path))
            if held.get("owner") == self.owner:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001 - the run's own error is already on its way
            if quiet:
                log.debug("could not check the lease of %s: %s", redact_url(self.url), err)
            else:
                self._left_behind(err)

    def release_after(self, error: Optional[BaseException]) -> None:
        """Release at the end of a run (``error`` None: as `release`, whose errors are raised) or as it stops on
        ``error``, without ever replacing that error. After an outage that outlasted the window, or on Ctrl-C /
        SystemExit, with one attempt; after any other error (the store up: a bad input, a non-finite loss)
        patiently, so that a stray 503 does not leave the lease behind, but a release that fails only logs a
        warning. A SIGTERM or Ctrl-C that interrupts a patient release gets one quick attempt before it goes on
        (and the run's own error, if any, is logged: the stop would hide it)."""
        quick = isinstance(error, (StorageUnavailable, KeyboardInterrupt, SystemExit))
        try:
            self.release(patient=not quick)
        except (KeyboardInterrupt, SystemExit) as stop:
            said = str(stop) or type(stop).__name__
            if error is None:
                log.warning("%s while giving the lease of %s back; one quick attempt", said, redact_url(self.url))
            else:
                log.error("%s while giving the lease of %s back after: %s: %s", said, redact_url(self.url),
                          type(error).__name__, redact_url(str(error)))
            self.release(patient=False)
            raise
        except Exception as err:  # noqa: BLE001
            if error is None:
                raise
            self._left_behind(err)  # the run's own error is the one to report

    def _left_behind(self, err: BaseException) -> None:
        log.warning("could not release the lease of %s (%s: %s); the next run takes it over once this "
                    "process is gone or its heartbeat is %.0f s old (or at once with --force)",
                    redact_url(self.url), type(err).__name__, redact_url(str(err)), self.stale_after_s)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], *_: object) -> None:
        self.release_after(exc)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _precondition_failed(err: BaseException) -> bool:
    """An S3 412 (a conditional write refused), as s3fs raises it: an OSError whose cause is botocore's error."""
    seen: Optional[BaseException] = err
    for _ in range(4):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return status == 412 or response.get("Error", {}).get("Code") == "PreconditionFailed"
        seen = seen.__cause__ or seen.__context__
    return False


def _etag(response: Any) -> Optional[str]:
    """The ETag of a PUT's response or of an object's info (s3fs passes botocore's dicts through)."""
    return response.get("ETag") if isinstance(response, dict) else None


def _dead_here(held: dict[str, Any]) -> bool:
    """The holder ran on this host and its process no longer exists (killed, crashed): no need to wait."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def _when(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (TypeError, ValueError):
        return "?"

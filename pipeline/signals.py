"""SIGTERM as an orderly stop: the job's own error path runs (its lease is given back) within a bounded grace.

Launchers stop a job with SIGTERM and follow with SIGKILL: DeepSpeed's launcher and torchrun
after 30 s when another rank failed, Slurm after ``KillWait`` (30 s by default) on preemption
or ``scancel``, Kubernetes after ``terminationGracePeriodSeconds``, ``ray job stop`` after a few
seconds. Python's default for SIGTERM is to die at once, so a job's folder lease was left for
the next run to wait out (5 minutes from another host). Under `sigterm_as_exit`:

- SIGTERM raises `Terminated` (a ``SystemExit``, code 143 as a shell reports death by SIGTERM)
  in the main thread at its next Python instruction, so ``except``/``finally`` blocks run: the
  lease is released with one attempt (`pipeline.lease.Lease.release_after`), and nothing is
  committed that was not complete (commits are atomic: an interrupted one is discarded by the
  next run).
- A watchdog thread learns of the signal through Python's wakeup file descriptor, which the
  interpreter's C-level handler writes to even while the main thread is blocked in C code (a
  collective waiting for a dead peer, say). If the process is still alive ``grace_s`` after the
  first SIGTERM it ends with ``os._exit(143)`` (without this module SIGTERM ended the job at
  once). The watchdog needs the GIL for a moment: C code that blocks while holding it (rare;
  blocking calls release it) defeats it, and the launcher's SIGKILL ends the process then.
- Later SIGTERMs change nothing (launchers forward the signal their process group already got, and
  the clean-up must not be cut short); SIGKILL still ends the process at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Iterator

EXIT_CODE = 128 + signal.SIGTERM
"""143: what a shell reports for a process SIGTERM ended."""

DEFAULT_GRACE_S = 20.0
"""Below the 30 s that DeepSpeed's launcher, torchrun and Slurm wait before SIGKILL."""


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM under `sigterm_as_exit`; exits with `EXIT_CODE`."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE)

    def __str__(self) -> str:
        return "stopped by SIGTERM"


def _say(message: str, block: bool = True) -> None:
    """One line to stderr that can neither raise nor (``block=False``) wait: a closed or full stderr pipe (a log
    collector that stopped reading) must not keep the stop from happening."""
    if block:
        try:
            print(message, file=sys.stderr, flush=True)
        except BaseException:  # noqa: BLE001
            pass
        return
    try:  # no O_NONBLOCK on fd 2: it is shared with other processes (sibling ranks, the launcher, the shell)
        data = (message + "\n").encode()[:select.PIPE_BUF]
        if select.select([], [2], [], 0)[1]:  # room for PIPE_BUF bytes: a write that small cannot block
            os.write(2, data)
    except BaseException:  # noqa: BLE001
        pass


def _ignore(signum, frame) -> None:
    """A Python-level handler that does nothing."""


_ACTIVE: list[int] = []
"""Depth of `sigterm_as_exit` blocks open in this process (a forked child starts with none)."""


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) inherits the handler and the wakeup descriptor, which is the
    # parent's socket: a SIGTERM sent to the child would arm the parent's watchdog. The child gets the defaults.
    if _ACTIVE:
        _ACTIVE.clear()
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def sigterm_as_exit(grace_s: float = DEFAULT_GRACE_S, what: str = "the job") -> Iterator[None]:
    """Within this block, SIGTERM raises `Terminated` in the main thread, and the process ends at most ``grace_s``
    after the first SIGTERM whatever it is doing (also when the block has ended by then: the process is on its
    way out). Outside the main thread (where Python cannot install handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)

    def watchdog() -> None:
        with reader:  # open until the end: later signals still write to it
            while True:
                try:
                    data = reader.recv(64)
                except OSError:
                    return
                if not data:  # shut down: the block ended without a SIGTERM
                    return
                if signal.SIGTERM in data:
                    break
            time.sleep(grace_s)
            _say(f"{what}: still running {grace_s:g}s after SIGTERM; ending it now", block=False)
            os._exit(EXIT_CODE)

    fired: list[bool] = []

    def handler(signum, frame) -> None:
        if fired:  # the stop is under way (the watchdog bounds it): a second SIGTERM must not cut its clean-up
            return  # short, and one usually follows: a launcher forwards the signal its process group received
        fired.append(True)
        # Child watchers must not cut the clean-up short either: torch's DataLoader raises from its SIGCHLD
        # handler when a worker dies, and the workers die of this same SIGTERM. A no-op handler, not SIG_DFL:
        # Python raises "Signal 17 ignored due to race condition" for a SIGCHLD already pending when its handler
        # became SIG_DFL.
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGCHLD, _ignore)
        _say(f"{what}: SIGTERM received; stopping (at most {grace_s:g}s to give its folder back)")
        raise Terminated()

    handler.orderly_stop = True  # type: ignore[attr-defined]

    thread = threading.Thread(target=watchdog, name="sigterm-watchdog", daemon=True)
    thread.start()
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous = signal.signal(signal.SIGTERM, handler)
    _ACTIVE.append(1)
    try:
        yield
    except BaseException as err:
        # Terminated can surface as another error: raised inside an extension module's initialisation (an import
        # under way: "ImportError: initialization failed"), or caught and re-raised by library code. Whatever
        # escapes once SIGTERM has fired is the stop, and ends as one.
        if not fired or isinstance(err, Terminated):
            raise
        _say(f"{what}: stopped by SIGTERM (it interrupted: {type(err).__name__}: {str(err)[:200]})")
        raise Terminated() from err
    finally:
        _ACTIVE.pop()
        # After a SIGTERM the process is on its way out (interpreter shutdown, atexit hooks, Ray's shutdown): the
        # handler stays, a no-op now, so that a second SIGTERM cannot cut that short either.
        if signal.getsignal(signal.SIGTERM) is handler and not fired:
            signal.signal(signal.SIGTERM, previous)
        signal.set_wakeup_fd(previous_fd)
        # A watchdog that saw SIGTERM keeps its deadline (it holds its end of the pair open); one that did not
        # wakes up to an empty read and returns.
        with contextlib.suppress(OSError):
            writer.shutdown(socket.SHUT_WR)
        writer.close()


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """Put `sigterm_as_exit`'s SIGTERM handler back after the block if it was in place: ``ray.init`` installs its
    own (``sys.exit``, which a second SIGTERM would raise again in the middle of the clean-up that
    `sigterm_as_exit` protects, and with exit code 15 instead of 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if getattr(before, "orderly_stop", False):  # only `sigterm_as_exit`'s: elsewhere Ray's may stay
            signal.signal(signal.SIGTERM, before)

"""SIGTERM as an orderly stop (`pipeline.signals.sigterm_as_exit`), on real processes sent real signals.

Each test runs a small program in its own interpreter that enters the block (holding a real lease on a
local folder where the test needs one), says it is ready, and is then sent SIGTERM by the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT

PRELUDE = """
import os, sys, time
from pipeline.lease import Lease
from pipeline.signals import sigterm_as_exit
"""


def start(code: str, tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the program's "ready": it is inside the block
    assert line.strip() == "ready", line + proc.stderr.read()
    return proc


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str, float]:
    start_ = time.monotonic()
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.monotonic() - start_


def test_sigterm_gives_the_lease_back_and_exits_143(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start(f"""
        with sigterm_as_exit(grace_s=30, what="the job"):
            with Lease({str(out)!r}, "a job"):
                print("ready", flush=True)
                while True:
                    time.sleep(0.05)
    """, tmp_path)
    assert (out / "_lease.json").exists()
    proc.send_signal(signal.SIGTERM)
    code, _, err, took = finish(proc)
    # Without the block Python dies on the spot (-15) and the lease stays for the next run to wait out.
    assert code == 143, err
    assert "the job: SIGTERM received" in err and "Traceback" not in err
    assert not (out / "_lease.json").exists()
    assert took < 25  # the orderly stop, not the watchdog's deadline


def test_a_second_sigterm_does_not_cut_the_clean_up_short(tmp_path):
    # A launcher forwards the SIGTERM its process group already received: the ranks get it twice, at once.
    proc = start("""
        try:
            with sigterm_as_exit(grace_s=30):
                print("ready", flush=True)
                while True:
                    time.sleep(0.05)
        finally:
            print("cleaning up", flush=True)
            time.sleep(1.5)
            print("cleaned up", flush=True)
    """, tmp_path)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # lands during the clean-up
    code, out, err, _ = finish(proc)
    assert code == 143 and "cleaned up" in out, out + err


def test_a_process_stuck_in_c_code_still_ends_within_the_grace(tmp_path):
    # The main thread blocks in pthread_mutex_lock on a mutex it holds: a signal does not interrupt that wait, so
    # Python's handler never runs (as in a collective waiting for a dead peer). The watchdog ends the process.
    proc = start("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        mutex = ctypes.create_string_buffer(64)  # zeros: PTHREAD_MUTEX_INITIALIZER, a normal mutex
        with sigterm_as_exit(grace_s=2, what="the job"):
            assert libc.pthread_mutex_lock(mutex) == 0
            print("ready", flush=True)
            libc.pthread_mutex_lock(mutex)  # never returns
    """, tmp_path)
    time.sleep(0.3)  # into the second lock
    proc.send_signal(signal.SIGTERM)
    code, _, err, took = finish(proc)
    assert code == 143 and "the job: still running 2s after SIGTERM; ending it now" in err, err
    assert 1.5 < took < 20


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_keeps_the_default_and_does_not_arm_the_parent(tmp_path):
    # A DataLoader worker is forked inside the block: a SIGTERM sent to it ends it as before (-15) and does not
    # reach the parent's watchdog through the inherited wakeup descriptor (the parent would end 1 s later).
    proc = start("""
        with sigterm_as_exit(grace_s=1):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            print("ready", flush=True)
            print(pid, flush=True)
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status), flush=True)
            time.sleep(3)  # past the grace: a parent armed by the child's signal would be gone
        print("done", flush=True)
    """, tmp_path)
    child = int(proc.stdout.readline())
    time.sleep(0.2)
    os.kill(child, signal.SIGTERM)
    code, out, err, _ = finish(proc)
    assert code == 0 and "child -15" in out and "done" in out, out + err
    assert "SIGTERM" not in err


def test_the_block_leaves_the_signal_as_it_found_it(tmp_path):
    proc = start("""
        import signal
        before = signal.getsignal(signal.SIGTERM)
        with sigterm_as_exit(grace_s=1):
            pass
        assert signal.getsignal(signal.SIGTERM) is before and signal.set_wakeup_fd(-1) == -1
        print("ready", flush=True)
        time.sleep(30)
    """, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, _, err, took = finish(proc)
    assert code == -signal.SIGTERM and took < 10, err  # Python's default again: ended on the spot

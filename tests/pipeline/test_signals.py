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


FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)


def wait_in_futex(pid: int, timeout: float = 30) -> None:
    """Until the process's main thread waits in the futex syscall (a mutex), as /proc shows it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if FUTEX is not None and Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(FUTEX):
                return
        except (OSError, IndexError):
            time.sleep(1.0)  # no /proc syscall file here: a second is plenty on an idle machine
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never blocked in the mutex")


@pytest.mark.parametrize("surfaces_as", ["Terminated", "ImportError"])
def test_sigterm_gives_the_lease_back_and_exits_143(tmp_path, surfaces_as):
    # ImportError: SIGTERM during an extension module's initialisation surfaces as "ImportError: initialization
    # failed" (seen: rank 0 importing matplotlib for its first pictures), and library code can catch Terminated and
    # raise its own error. Once SIGTERM has fired, what escapes the block is the stop all the same, the interrupted
    # error named in one line.
    out = tmp_path / "out"
    out.mkdir()
    reraise = ("" if surfaces_as == "Terminated" else
               'except Terminated as stop:\n    raise ImportError("initialization failed") from stop')
    proc = start(f"""
        from pipeline.signals import Terminated
        with sigterm_as_exit(grace_s=30, what="the job"):
            with Lease({str(out)!r}, "a job"):
                try:
                    print("ready", flush=True)
                    while True:
                        time.sleep(0.05)
                {textwrap.indent(reraise, " " * 16).strip() or "finally: pass"}
    """, tmp_path)
    assert (out / "_lease.json").exists()
    proc.send_signal(signal.SIGTERM)
    code, _, err, took = finish(proc)
    # Without the block Python dies on the spot (-15) and the lease stays for the next run to wait out.
    assert code == 143, err
    assert "the job: SIGTERM received" in err and "Traceback" not in err
    if surfaces_as == "ImportError":
        assert "the job: stopped by SIGTERM (it interrupted: ImportError: initialization failed)" in err, err
    assert not (out / "_lease.json").exists()
    assert took < 25  # the orderly stop, not the watchdog's deadline


def test_an_error_before_any_sigterm_passes_through_unchanged(tmp_path):
    proc = start("""
        with sigterm_as_exit(grace_s=30, what="the job"):
            print("ready", flush=True)
            raise ImportError("a real one")
    """, tmp_path)
    code, _, err, _ = finish(proc)
    assert code == 1 and "Traceback" in err and "ImportError: a real one" in err and "SIGTERM" not in err


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
    assert proc.stdout.readline().strip() == "cleaning up"
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
    wait_in_futex(proc.pid)  # into the second lock
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
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(w, b"x")  # past os.fork(): its at-fork hooks have run
                time.sleep(60)
                os._exit(0)
            os.read(r, 1)
            print("ready", flush=True)
            print(pid, flush=True)
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status), flush=True)
            time.sleep(3)  # past the grace: a parent armed by the child's signal would be gone
        print("done", flush=True)
    """, tmp_path)
    child = int(proc.stdout.readline())
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


@pytest.mark.slow
def test_sigterm_to_a_preprocessing_job_gives_its_output_back_and_a_rerun_reuses_its_shards(tmp_path):
    # `ray job stop` or a preemption sends the driver SIGTERM while its shard tasks run. ray.init installs Ray's
    # own handler (sys.exit(15), raised again by every later SIGTERM); the job keeps its orderly stop instead.
    from pipeline import synthetic
    from pipeline.job import PROGRESS_DIR

    archive, out = tmp_path / "tiff", tmp_path / "shards"
    synthetic.make_ssl4eo_tiff(str(archive), n_locations=40, size=12, seed=5)  # 160 samples, one shard each
    cmd = [sys.executable, "-m", "pipeline.preprocess", "--no-progress", "--source", "ssl4eo-tiff", "--input",
           str(archive), "--output", str(out), "--workers", "1", "--samples-per-shard", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / PROGRESS_DIR).glob("*.json")) if (out / PROGRESS_DIR).exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    assert (out / "_lease.json").exists()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a second one at once (a launcher forwarding its group's): no difference
    code, _, err, took = finish(proc, timeout=60)
    assert code == 143, err[-3000:]
    assert "preprocessing: SIGTERM received" in err and "Traceback" not in err, err[-3000:]
    assert not (out / "_lease.json").exists() and not (out / "manifest.json").exists()
    assert took < 20
    built = len(list((out / PROGRESS_DIR).glob("*.json")))
    assert 0 < built < 160
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"reusing {built} shards" in rerun.stdout and "taking over" not in rerun.stderr


def test_sigterm_during_a_patient_release_makes_one_quick_attempt_and_says_the_runs_error(tmp_path, s3_bucket,
                                                                                          store_proxy):
    # A run stops on its own error and releases its lease patiently (the store blips); the launcher, stopping
    # the other ranks after this one failed, sends SIGTERM in the middle of that. The error the run stopped on
    # is still said, and one quick attempt is made before the stop takes over.
    root = s3_bucket.removeprefix("s3://")
    store_proxy.trigger(f"GET /{root}/out/_lease.json".encode(), 600.0)  # the patient release's read: waits
    proc = start(f"""
        from pipeline.storage import set_retry_window
        set_retry_window(300)
        options = {{"skip_instance_cache": True, "endpoint_url": {store_proxy.url!r},
                    "config_kwargs": {{"retries": {{"max_attempts": 1}}}}}}
        with sigterm_as_exit(grace_s=30, what="the job"):
            with Lease({s3_bucket + '/out'!r}, "a job", options):
                print("ready", flush=True)
                raise ValueError("the input is bad")
    """, tmp_path)
    deadline = time.monotonic() + 30
    while store_proxy.triggered_at is None:  # the release is waiting out the outage
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code, _, err, took = finish(proc)
    assert code == 143 and took < 25, err
    assert "Terminated" in err or "stopped by SIGTERM" in err
    assert "while giving the lease of" in err and "ValueError: the input is bad" in err
    assert "could not release the lease" in err  # the quick attempt met the outage too: said, and left

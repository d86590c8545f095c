"""The single-writer lease: refused while another live run holds it, taken over when it is stale or gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.lease import LEASE, Lease, LeaseHeld


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_held_lease_is_refused_naming_its_holder(tmp_path, s3_bucket, where):
    url = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    with Lease(url, "first job") as first:
        with pytest.raises(LeaseHeld, match=r"being written by another run \(first job on .*pid " + str(os.getpid())):
            Lease(url, "second job").acquire()
        assert first.owns()
    again = Lease(url, "third job").acquire()  # released at the end of the with block: free again
    again.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exclusive_create_lets_only_one_of_two_racing_writers_win(tmp_path, s3_bucket, where):
    url = str(tmp_path / "race") if where == "local" else f"{s3_bucket}/race"
    a, b = Lease(url, "a"), Lease(url, "b")
    assert a._create() is True and b._create() is False  # an exclusive link / the store's conditional PUT decides
    assert a.holder()["owner"] == a.owner  # the winner's lease, whole from the moment it exists
    if where == "local":
        assert os.listdir(tmp_path / "race") == [LEASE]  # no private file left behind by either


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_already_holding_this_owner_is_taken_not_refused(tmp_path, s3_bucket, where):
    """A retried create whose first attempt landed (its reply lost in an outage) finds the lease it wrote: the
    store refuses the retry, and the lease it finds is this run's own, fresh, from this live process."""
    url = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    first = Lease(url, "job", owner="0123456789abcdef")
    assert first._create() is True  # what the lost attempt left in the store
    again = Lease(url, "job", owner="0123456789abcdef")
    with again:
        assert again.owns()
    assert again.holder() is None


def test_a_stale_or_dead_holder_is_taken_over_and_force_takes_a_fresh_one(tmp_path):
    url = str(tmp_path / "out")
    os.makedirs(url)
    # a holder on another host whose heartbeat stopped 10 minutes ago
    (tmp_path / "out" / LEASE).write_text(json.dumps({"owner": "gone", "host": "elsewhere", "pid": 1,
                                                      "heartbeat": time.time() - 600, "started": 0}))
    Lease(url, "after a crash").acquire().release()
    # a holder on this host whose process has exited
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "out" / LEASE).write_text(json.dumps({"owner": "x", "host": os.uname().nodename, "pid": dead.pid,
                                                      "heartbeat": time.time(), "started": 0}))
    Lease(url, "after a kill").acquire().release()
    # a fresh holder elsewhere: refused, unless forced
    (tmp_path / "out" / LEASE).write_text(json.dumps({"owner": "alive", "host": "elsewhere", "pid": 1,
                                                      "heartbeat": time.time(), "started": 0}))
    with pytest.raises(LeaseHeld):
        Lease(url, "polite").acquire()
    Lease(url, "forced", force=True).acquire().release()


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path):
    url = str(tmp_path / "out")
    with Lease(url, "long", stale_after_s=0.4):
        first = json.loads((tmp_path / "out" / LEASE).read_text())["heartbeat"]
        time.sleep(0.5)
        later = json.loads((tmp_path / "out" / LEASE).read_text())["heartbeat"]
        assert later > first
        with pytest.raises(LeaseHeld):  # 0.5 s after taking it, the lease is fresh thanks to the heartbeat
            Lease(url, "other", stale_after_s=0.4).acquire()
    assert not (tmp_path / "out" / LEASE).exists()

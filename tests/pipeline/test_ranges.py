"""`pipeline.sources.ranges`: which pieces of an object one read-ahead request fetches, and how its pieces are
handed out (the sources' own tests read real archives through it on the moto server)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.sources import ranges


def _groups(pieces, gap_bytes=0, run_bytes=100):
    return [[name for name, _, _ in run] for run in ranges.runs(pieces, lambda p: (p[1], p[2]), gap_bytes, run_bytes)]


def test_a_request_spans_neighbours_up_to_its_limit_from_its_first_byte():
    pieces = [("c", 20, 30), ("a", 0, 10), ("b", 10, 20)]  # not in order: grouped in the object's order
    assert _groups(pieces, run_bytes=30) == [["a", "b", "c"]]
    # the limit counts from the request's first byte, not from the last piece's: a + b is 20 bytes, a + b + c 30
    assert _groups(pieces, run_bytes=20) == [["a", "b"], ["c"]]
    assert _groups(pieces, run_bytes=5) == [["a"], ["b"], ["c"]]  # each larger than the limit: a request each


def test_a_gap_up_to_its_limit_is_spanned_and_overlapping_pieces_are_apart():
    pieces = [("a", 0, 10), ("b", 14, 20), ("c", 18, 25)]  # 4 bytes between a and b; c begins inside b
    assert _groups(pieces, gap_bytes=3) == [["a"], ["b"], ["c"]]
    assert _groups(pieces, gap_bytes=4) == [["a", "b"], ["c"]]
    assert _groups([]) == []


def test_a_piece_asked_for_twice_is_fetched_once_and_given_to_each():
    """Two locations of one batch may need the same piece (a chunk holding several locations, a location read twice):
    one request, one piece in it, and each taker gets its value."""
    calls = []

    def fetch_run(run):
        calls.append([name for name, _, _ in run])
        return {name: f"bytes of {name}" for name, _, _ in run}

    with ThreadPoolExecutor(2) as pool:
        got = ranges.submit(pool, fetch_run, [("a", 0, 10), ("b", 10, 20), ("a", 0, 10)], lambda p: (p[1], p[2]),
                            lambda p: p[0])
        assert sorted(got) == ["a", "b"]
        assert got["a"].result() == got["a"].result() == "bytes of a" and got["b"].result() == "bytes of b"
    assert calls == [["a", "b"]]


def test_a_piece_error_is_its_own_and_a_request_error_is_everyones():
    def fetch_run(run):
        if any(name == "x" for name, _, _ in run):
            raise TimeoutError("the store did not answer")
        return {name: ValueError(f"{name} is damaged") if name == "b" else name for name, _, _ in run}

    with ThreadPoolExecutor(2) as pool:
        got = ranges.submit(pool, fetch_run, [("a", 0, 10), ("b", 10, 20), ("x", 50, 60), ("y", 60, 70)],
                            lambda p: (p[1], p[2]), lambda p: p[0], gap_bytes=0)  # two requests: a + b, x + y
        assert got["a"].result() == "a"
        with pytest.raises(ValueError, match="b is damaged"):
            got["b"].result()
        for name in ("x", "y"):  # one request (60 is where x ends)
            with pytest.raises(TimeoutError, match="did not answer"):
                got[name].result()


def test_a_shared_request_is_cancelled_only_once_none_of_its_pieces_is_wanted():
    started, release = threading.Event(), threading.Event()

    def blocker(_run):
        started.set()
        release.wait(10)
        return {}

    with ThreadPoolExecutor(1) as pool:
        busy = ranges.submit(pool, blocker, [("z", 0, 1)], lambda p: (p[1], p[2]), lambda p: p[0])
        assert started.wait(10)  # the only thread is taken: the next request waits in the queue
        got = ranges.submit(pool, lambda run: {name: name for name, _, _ in run}, [("a", 0, 10), ("b", 10, 20)],
                            lambda p: (p[1], p[2]), lambda p: p[0])
        future = got["a"].run.future
        assert got["b"].run is got["a"].run
        got["a"].cancel()
        got["a"].cancel()  # a piece given up twice counts once
        assert not future.cancelled()  # b still wants it
        got["b"].cancel()
        assert future.cancelled()
        release.set()
        assert busy["z"].run.future.result(10) == {}

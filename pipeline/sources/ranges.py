"""Ranged reads for read-ahead, neighbours merged: fewer, larger requests to an object store.

A read-ahead that asks for each piece of an object on its own (a zip entry of a chunk file, a tar member of a
WebDataset release) pays a round trip per piece, and a store bills by the request. Pieces that lie side by side
are fetched as one ranged request instead (`runs`): up to `RUN_BYTES` (AWS's whitepaper "Best Practices Design
Patterns: Optimizing Amazon S3 Performance", section "Use Byte-Range Fetches": "Typical sizes for byte-range
requests are 8 MB or 16 MB"), with at most `GAP_BYTES` between two of them (a tar
header, a zip entry of another array), fetched and dropped. The request's bytes are then cut into its pieces by
the caller's ``fetch_run``, which judges each piece apart: one damaged piece is that piece's error only.

Used by `pipeline.sources.ssl4eo_zarr` (chunks) and `pipeline.sources.wds_zarr` (members).
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from typing import Any, Callable, Hashable, Iterable, Sequence, TypeVar

RUN_BYTES = 8 << 20
"""The most one request spans; a piece larger than this is one request of its own."""
GAP_BYTES = 64 << 10
"""The most bytes between two pieces that one request spans (and drops)."""

P = TypeVar("P")


def runs(pieces: Iterable[P], extent: Callable[[P], tuple[int, int]], gap_bytes: int = GAP_BYTES,
         run_bytes: int = RUN_BYTES) -> list[list[P]]:
    """``pieces`` grouped into the requests that fetch them: in the order of their start (``extent(piece)`` is its
    ``[start, end)`` in the object), a piece joins the previous one's request when it begins at most ``gap_bytes``
    after that one ends (not before: overlapping pieces are apart) and the request then spans at most
    ``run_bytes``."""
    out: list[list[P]] = []
    run_start = end = 0
    for piece in sorted(pieces, key=lambda p: extent(p)[0]):
        start, stop = extent(piece)
        if out and 0 <= start - end <= gap_bytes and stop - run_start <= run_bytes:
            out[-1].append(piece)
        else:
            out.append([piece])
            run_start = start
        end = stop
    return out


class Run:
    """One request's future (its pieces' values by name) and how many of its pieces are still wanted."""

    def __init__(self, future: Future, pieces: int):
        self.future, self.wanted = future, pieces


class Fetched:
    """One piece of a request (`submit`): `result` gives its value (a view of the request's bytes, which stay in
    memory while any piece of the request is held), or raises what fetching the request or judging the piece raised,
    as often as it is asked; `cancel` gives the piece up, and the request too once none of its pieces is wanted."""

    def __init__(self, run: Run, name: Hashable):
        self.run, self.name = run, name
        self._given_up = False

    def result(self) -> Any:
        value = self.run.future.result()[self.name]  # a failed request (an outage, a refusal): raised for each piece
        if isinstance(value, BaseException):
            raise value
        return value

    def cancel(self) -> None:
        if self._given_up:
            return
        self._given_up = True
        self.run.wanted -= 1
        if self.run.wanted <= 0:
            self.run.future.cancel()


def submit(pool: Executor, fetch_run: Callable[[Sequence[P]], dict[Hashable, Any]], pieces: Iterable[P],
           extent: Callable[[P], tuple[int, int]], name: Callable[[P], Hashable], gap_bytes: int = GAP_BYTES,
           run_bytes: int = RUN_BYTES) -> dict[Hashable, Fetched]:
    """Fetch ``pieces`` of one object on ``pool``, one request per `runs` group: ``fetch_run(run)`` makes the request
    and returns each piece's value (or the exception judging it gave) by ``name(piece)``. A piece asked for more than
    once (a chunk holding several locations, a location read twice) is fetched once. {name: `Fetched`}."""
    unique: dict[Hashable, P] = {}
    for piece in pieces:
        unique.setdefault(name(piece), piece)
    out: dict[Hashable, Fetched] = {}
    for run in runs(unique.values(), extent, gap_bytes, run_bytes):
        shared = Run(pool.submit(fetch_run, run), len(run))
        out.update((name(piece), Fetched(shared, name(piece))) for piece in run)
    return out

"""Listing a GeoTIFF tree in pieces: the driver lists one level, inventory tasks list the rest.

A GeoTIFF release is millions of small files (SSL4EO-S12 v1: about 15 million under
250k location folders; BigEarthNet v2: about 7.7 million under 549k patch folders). One
recursive listing of such a tree on the driver is one sequential walk of the whole
bucket (1,000 keys per S3 request) and millions of path strings in the driver's
memory. The sources list only the first level of their tree on the driver
(`subfolders`: location or tile folders, tens of bytes each), cut it into groups in
plan order (`groups`), and list each group's folders inside an inventory task on the
cluster (`find_all` / `subfolders_all`), whose work items stay in Ray's object store
(`pipeline.inventory`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence, TypeVar

from pipeline.storage import is_local, retrying

T = TypeVar("T")

LISTING_THREADS = 16
"""Folder listings in flight per inventory task on an object store: a listing is one or a few requests that
wait on the network, so a task keeps several going (a local disk is listed one folder at a time)."""


def groups(seq: Sequence[T], size: int) -> Iterator[list[T]]:
    """``seq`` in consecutive groups of ``size`` (the last one shorter), in order."""
    if size < 1:
        raise ValueError(f"a group holds at least one entry, got {size}")
    for i in range(0, len(seq), size):
        yield list(seq[i:i + size])


def _bare(fs, path: str) -> str:
    """``path`` as ``fs`` names what it lists: without protocol ('s3://', 'file://') or trailing slash."""
    return fs._strip_protocol(path).rstrip("/")


def forget(fs, path: str) -> None:
    """Drop what ``fs`` cached of the listings of ``path`` and everything under it.

    s3fs (and other object-store filesystems) keep every listing in ``fs.dircache`` for the life of the
    filesystem object, which fsspec shares within a process: about 1 KB per file listed. A Ray worker that runs
    inventory tasks over millions of files, or a driver that listed 250k location folders, would keep them all;
    the listings are used once, so they are forgotten at once."""
    cache = getattr(fs, "dircache", None)
    if not cache:
        return
    base = _bare(fs, path)
    for key in [k for k in list(cache) if k == base or k.startswith(base + "/")]:
        cache.pop(key, None)


def subfolders(fs, path: str) -> list[str]:
    """Names of the folders directly under ``path``, sorted; [] when ``path`` does not exist."""
    try:
        entries = retrying(fs.ls)(path, detail=True)
    except FileNotFoundError:
        return []
    finally:
        forget(fs, path)
    base = _bare(fs, path)
    names = []
    for e in entries:
        name = e["name"].rstrip("/")
        # an object store lists a folder's own marker object (key "path/") as an entry of itself
        if e.get("type") == "directory" and name != base:
            names.append(name.rsplit("/", 1)[-1])
    return sorted(names)


def _map(fs, fn, paths: Sequence[str]) -> dict[str, list[str]]:
    if is_local(fs) or len(paths) < 2:
        return {p: fn(p) for p in paths}
    with ThreadPoolExecutor(min(LISTING_THREADS, len(paths))) as pool:
        return dict(zip(paths, pool.map(fn, paths)))


def find_all(fs, paths: Sequence[str]) -> dict[str, list[str]]:
    """{path: the files under it, recursively, as paths relative to it ('a/b.tif'), sorted} for each of
    ``paths`` ([] for a folder that does not exist); transient storage errors are retried (`retrying`).
    A folder's own marker object on an object store (key 'a/') is not a file: it is left out."""

    def find(path: str) -> list[str]:
        base = _bare(fs, path) + "/"
        try:
            found = retrying(fs.find)(path)
        except FileNotFoundError:
            return []
        finally:
            forget(fs, path)
        return sorted(p[len(base):] for p in found if p.startswith(base) and not p.endswith("/") and p != base)

    return _map(fs, find, paths)


def subfolders_all(fs, paths: Sequence[str]) -> dict[str, list[str]]:
    """{path: `subfolders` of it} for each of ``paths``."""
    return _map(fs, lambda p: subfolders(fs, p), paths)

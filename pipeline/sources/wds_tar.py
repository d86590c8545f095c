"""Input tars of the WebDataset releases, read by byte range: their member index and one member's bytes.

The releases are hundreds of multi-GB tars in object storage. Nothing here reads a tar
whole: `index_tar` walks the 512-byte headers (one small range read each, through the
project's one tar walk, `pipeline.shards.walk_members`) and `read_member` fetches one
member's bytes at the offset the index recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Optional

from pipeline.shards import walk_members
from pipeline.storage import RetryingFile, StorageUnavailable, is_local, retrying
from pipeline.sources.zarr_member import MEMBER_EXT

_BLOCK = 512


@dataclass(frozen=True)
class MemberRef:
    """Where one ``<key>.zarr.zip`` member's bytes are in its tar."""

    key: str
    offset: int
    size: int


@dataclass
class TarIndex:
    """The members of one tar in stored order, and what stopped the walk early, if anything."""

    path: str
    members: list[MemberRef] = field(default_factory=list)
    truncated: list[MemberRef] = field(default_factory=list)
    """Members whose data runs past the end of the file."""
    problem: Optional[str] = None
    """Why members after the last listed one, if any, cannot be known (a broken header, a cut file)."""


def open_ranged(fs, path: str) -> BinaryIO:
    """A file object for byte-range reads: on object stores every read is one request of that size, retried
    through transient errors (`RetryingFile`: an outage stops the job, it does not quarantine members)."""
    if is_local(fs):
        return open(path, "rb")
    # No read-ahead cache: walking the headers must not download the members between them.
    return RetryingFile(fs, path, cache_type="none")  # type: ignore[return-value]


def index_tar(fs, path: str) -> TarIndex:
    """Walk the headers of the tar at ``path`` (a path of ``fs``); members other than .zarr.zip are skipped."""
    index = TarIndex(path)
    size = retrying(fs.size)(path)
    end = 0  # where the data of the last member seen ends, padded to a block
    try:
        with open_ranged(fs, path) as f:
            for m in walk_members(f):
                end = m.offset_data + -(-m.size // _BLOCK) * _BLOCK
                if m.ext != MEMBER_EXT:
                    continue
                ref = MemberRef(m.key, m.offset_data, m.size)
                (index.members if m.offset_data + m.size <= size else index.truncated).append(ref)
            index.problem = _end_problem(f, end, size)
    except StorageUnavailable:  # the store, not the tar: the job stops
        raise
    except Exception as err:  # noqa: BLE001 - a header tarfile cannot parse: what came before is still usable
        index.problem = (f"unreadable tar after byte {end} ({type(err).__name__}: {err}); "
                         "later members cannot be listed")
    return index


def _end_problem(f: BinaryIO, end: int, size: int) -> Optional[str]:
    """None when the walk stopped at the end-of-archive marker (a zero block), else what is wrong.

    tarfile ends a walk silently at a header it cannot parse or a short read, so a cut or
    damaged tar would otherwise look like a shorter, complete one."""
    if end >= size:
        return f"tar ends at byte {size} without its end-of-archive marker (truncated)"
    f.seek(end)
    block = f.read(_BLOCK)
    if len(block) == _BLOCK and not any(block):
        return None
    return f"unreadable tar header at byte {end} (truncated or damaged); later members cannot be listed"


def read_member(f: BinaryIO, ref: MemberRef) -> bytes:
    """The bytes of ``ref`` from its open tar (one range read)."""
    f.seek(ref.offset)
    data = f.read(ref.size)
    if len(data) != ref.size:
        raise EOFError(f"member {ref.key}.{MEMBER_EXT} truncated ({len(data)} of {ref.size} bytes)")
    return data

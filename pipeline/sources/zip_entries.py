"""Stored zip entries read from their bytes, judged as `zipfile` judges an entry it reads itself.

Zarr's ZipStore and the SSL4EO-S12 v1.1 / TerraMesh releases store every entry uncompressed (the chunks are
compressed by their own codec), so an entry is a local file header, its name, an extra field and the data. Two
readers take those bytes straight from where they already are instead of through ``ZipFile.read`` (a file object,
a copy and ~25 us of Python per entry):

- `pipeline.sources.zarr_member`: a WebDataset member (``<key>.zarr.zip``) is in memory, so each entry is a
  `memoryview` of it (no copy);
- `pipeline.sources.ssl4eo_zarr`: chunk files on an object store are read ahead, entries that lie side by side in
  one ranged request (`pipeline.sources.ranges`), each entry a view of its request's bytes.

`stored_entry` makes zipfile's checks of a stored entry with zipfile's words, so a damaged entry is rejected alike
either way: the local header's magic, the name in the local header against the central directory's, an entry
running into the next (where this Python's zipfile checks it: 3.11.8, 3.12.2 and later), the length, and the CRC-32.
One difference: a local name that is not valid UTF-8 under the UTF-8 flag is a ``BadZipFile`` here (names differ),
a ``UnicodeDecodeError`` in zipfile. Anything else (deflated, encrypted, patched entries) is `zipfile`'s to read
(`is_stored` says which).
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from typing import Callable, Union

Buffer = Union[bytes, memoryview]

MAX_EXTRA = 0xFFFF
"""The longest extra field a local header can have (a 16-bit length)."""


def is_stored(info: zipfile.ZipInfo) -> bool:
    """Stored, not encrypted, not patched: an entry `stored_entry` reads."""
    return info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & (0x1 | 0x20 | 0x40)


def stored_entry(info: zipfile.ZipInfo, read: Callable[[int, int], Buffer], slack: int = 1024) -> Buffer:
    """The data of stored entry ``info`` (`is_stored`), with ``read(start, end)`` giving the archive's bytes
    ``[start, end)`` (fewer at its end). One read of the local header, name, directory-sized extra field, data and
    ``slack`` bytes more (a local extra field longer than the directory's); a second for the rest where that was
    not enough. Raises what zipfile raises for the same damage (``BadZipFile`` with its message, ``EOFError`` for
    data cut short)."""
    start = info.header_offset
    name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    buf = read(start, start + zipfile.sizeFileHeader + len(name) + len(info.extra) + info.compress_size + slack)
    if len(buf) < zipfile.sizeFileHeader:
        raise zipfile.BadZipFile("Truncated file header")
    header = struct.unpack(zipfile.structFileHeader, buf[:zipfile.sizeFileHeader])
    if header[0] != zipfile.stringFileHeader:
        raise zipfile.BadZipFile("Bad magic number for file header")
    name_end = zipfile.sizeFileHeader + header[10]  # + file name length
    data_at = name_end + header[11]  # + extra field length
    end = data_at + info.compress_size
    overlap_end = getattr(info, "_end_offset", None)  # where this Python's zipfile says the next entry begins
    if overlap_end is not None and start + end > overlap_end:
        raise zipfile.BadZipFile(f"Overlapped entries: {info.orig_filename!r} (possible zip bomb)")
    if end > len(buf):
        buf = bytes(buf) + bytes(read(start + len(buf), start + end))
    local_name = bytes(buf[zipfile.sizeFileHeader:name_end])
    if local_name.decode("utf-8" if header[3] & 0x800 else "cp437", "replace") != info.orig_filename:
        raise zipfile.BadZipFile(f"File name in directory {info.orig_filename!r} and header {local_name!r} differ.")
    data = buf[data_at:end]
    if len(data) != info.file_size:
        raise EOFError  # as zipfile's read of a stored entry cut short
    if zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.orig_filename!r}")
    return data


def entries_in_memory(data: Buffer) -> dict[str, Buffer]:
    """Every file entry of the zip ``data`` by name (the last of a repeated name, as ``ZipFile.read`` gives it):
    stored entries as views of ``data``, checked by `stored_entry`; any other kind read by zipfile."""
    import io

    view = memoryview(data)
    out: dict[str, Buffer] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        last = {info.filename: info for info in zf.infolist() if not info.filename.endswith("/")}
        for name, info in last.items():  # an earlier entry of a repeated name is never read, as by ZipFile.read
            if is_stored(info):
                out[name] = stored_entry(info, lambda a, b: view[a:b], slack=MAX_EXTRA)
            else:
                out[name] = zf.read(info)
    return out

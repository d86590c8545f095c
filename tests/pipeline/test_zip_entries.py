"""Stored zip entries read from their bytes (`pipeline.sources.zip_entries`) against zipfile reading them itself.

The WebDataset members are read with `entries_in_memory` and the chunk files on an object store with
`stored_entry`: a damaged entry must be refused as zipfile refuses it (the same exception, the same words), and
anything zipfile reads must come back with the same bytes.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from pipeline.sources.zip_entries import entries_in_memory, is_stored, stored_entry


def _zip() -> bytes:
    """Stored and deflated entries, a folder entry, a repeated name, a UTF-8 name, an empty entry, and one whose
    local header carries a zip64 extra field the central directory does not (forced zip64 on a small entry)."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("bands/0.0.0", rng.integers(0, 255, 5000, dtype=np.uint8).tobytes())
        zf.writestr(".zmetadata", b'{"metadata": {}}')
        zf.writestr("deflated", b"abc" * 1000, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("folder/", b"")
        zf.writestr("twice", b"first")
        zf.writestr("twice", b"second")
        zf.writestr("bänder/0", b"utf-8 name")
        zf.writestr("empty", b"")
        with zf.open(zipfile.ZipInfo("zip64"), "w", force_zip64=True) as f:
            f.write(b"local extra field longer than the directory's")
    return buf.getvalue()


def test_every_entry_reads_as_zipfile_reads_it():
    data = _zip()
    got = entries_in_memory(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        assert {n: bytes(v) for n, v in got.items()} == {n: zf.read(n) for n in names}
        infos = {i.filename: i for i in zf.infolist()}
        assert len(infos["zip64"].extra) == 0  # the directory has no extra field; the local header has one
    assert bytes(got["twice"]) == b"second"  # the last of a repeated name, as ZipFile.read gives it
    assert isinstance(got["bands/0.0.0"], memoryview) and isinstance(got["deflated"], bytes)  # views, no copy
    assert got["bands/0.0.0"].obj is data


def _damaged(data: bytes, name: str, how: str) -> bytes:
    """``data`` with entry ``name`` damaged ``how``; the central directory left as it was."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    out = bytearray(data)
    at = info.header_offset
    if how == "magic":
        out[at] ^= 0xFF
    elif how == "local name":
        out[at + zipfile.sizeFileHeader] = ord("X")
    elif how == "data byte":
        name_len = int.from_bytes(data[at + 26:at + 28], "little")
        extra_len = int.from_bytes(data[at + 28:at + 30], "little")
        out[at + zipfile.sizeFileHeader + name_len + extra_len + 10] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("how", ["magic", "local name", "data byte"])
def test_a_damaged_entry_is_refused_with_zipfiles_error(how):
    data = _damaged(_zip(), "bands/0.0.0", how)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        with pytest.raises(Exception) as expected:
            zf.read("bands/0.0.0")
    with pytest.raises(type(expected.value)) as got:
        entries_in_memory(data)
    assert str(got.value) == str(expected.value)
    assert type(expected.value) is zipfile.BadZipFile


def test_data_cut_short_and_a_second_read_for_a_longer_local_header():
    data = _zip()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("zip64")
        expected = zf.read("zip64")
    assert is_stored(info)
    reads: list[tuple[int, int]] = []

    def read(start: int, end: int) -> bytes:
        reads.append((start, end))
        return data[start:end]

    # no slack: the local zip64 extra field is longer than the directory says, so the rest is read once more
    assert stored_entry(info, read, slack=0) == expected and len(reads) == 2
    with pytest.raises(EOFError):  # an archive that ends inside the entry's data, as zipfile says it
        stored_entry(info, lambda start, end: data[start:min(end, info.header_offset + 40)])
    with pytest.raises(zipfile.BadZipFile, match="Truncated file header"):
        stored_entry(info, lambda start, end: data[start:start + 10])


def _flagged(data: bytes, name: str, bit: int) -> bytes:
    """``data`` with general-purpose flag ``bit`` set for ``name`` in its local header and the central directory."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info, directory = zf.getinfo(name), zf.start_dir
    out = bytearray(data)
    out[info.header_offset + 6] |= bit
    record = data.index(name.encode(), directory) - 46  # the directory record of ``name``: its name at byte 46
    assert data[record:record + 4] == b"PK\x01\x02"
    out[record + 8] |= bit
    return bytes(out)


@pytest.mark.parametrize("bit", [0x1, 0x20, 0x40], ids=["encrypted", "patched", "strong encryption"])
def test_what_is_not_stored_plainly_is_left_to_zipfile(bit):
    with zipfile.ZipFile(io.BytesIO(_zip())) as zf:
        assert not is_stored(zf.getinfo("deflated")) and is_stored(zf.getinfo("bands/0.0.0"))
    data = _flagged(_zip(), "bands/0.0.0", bit)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert not is_stored(zf.getinfo("bands/0.0.0"))
        with pytest.raises(Exception) as expected:
            zf.read("bands/0.0.0")
    with pytest.raises(type(expected.value), match="encrypt|patched"):  # zipfile's own error, from zipfile
        entries_in_memory(data)


def test_only_the_last_of_a_repeated_name_is_read():
    # ZipFile.read(name) reads the last entry of that name: a damaged earlier one is never looked at, here neither
    data = _zip()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        first = next(i for i in zf.infolist() if i.filename == "twice")
    damaged = bytearray(data)
    damaged[first.header_offset] ^= 0xFF
    assert bytes(entries_in_memory(bytes(damaged))["twice"]) == b"second"

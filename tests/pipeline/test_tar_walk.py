"""The one tar walk (`pipeline.shards.walk_members`) against Python's own tarfile: the same members at the same
offsets for every header format tarfile writes, and tarfile's rules for damaged and cut files."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.shards import walk_members

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def make_tar(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("some.folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        names = ["a.json", "a.s1.npy", "d" * 90 + "/" + "k" * 80 + ".s2.npy", "b.json", "c.tar.gz", "x"]
        if fmt != tarfile.USTAR_FORMAT:  # too long for ustar's fields, non-ASCII: pax or GNU long-name records
            names[3] = "b" * 120 + ".json"
            names.append("étoile_" + "z" * 100 + ".s2.npy")
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = [0, 1, 511, 512, 513, 5000, 77][i]
            tar.addfile(info, io.BytesIO(bytes([i % 251]) * info.size))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.json"
        tar.addfile(link)
    return buf.getvalue()


def tarfile_members(data: bytes) -> list[tuple[str, int, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar if m.isfile()]


def walked(data: bytes) -> list[tuple[str, int, int, int]]:
    return [(f"{m.key}.{m.ext}" if m.ext else m.key, m.offset, m.offset_data, m.size)
            for m in walk_members(io.BytesIO(data))]


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_the_walk_finds_what_tarfile_finds(fmt):
    data = make_tar(fmt)
    want = tarfile_members(data)
    assert len(want) == (7 if fmt != tarfile.USTAR_FORMAT else 6)
    assert walked(data) == want
    m = next(m for m in walk_members(io.BytesIO(data)) if m.size == 511)
    assert m.key == "d" * 90 + "/" + "k" * 80 and m.ext == "s2.npy"  # webdataset's key: the folder stays in it


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_a_damaged_header_ends_the_walk_where_tarfile_ends(fmt):
    data = bytearray(make_tar(fmt))
    third = tarfile_members(bytes(data))[2]
    data[third[1] + 10] ^= 0xFF  # the checksum no longer matches
    assert walked(bytes(data)) == tarfile_members(bytes(data)) == tarfile_members(make_tar(fmt))[:2]


def test_cut_data_and_a_file_that_is_no_tar_raise_as_tarfile_does():
    data = make_tar(tarfile.GNU_FORMAT)
    name, _, offset_data, _ = tarfile_members(data)[-1]
    cut = data[:offset_data + 10]  # the last member's data runs past the end
    with pytest.raises(tarfile.ReadError):
        tarfile_members(cut)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        walked(cut)
    boundary = tarfile_members(data)[3][1]  # a member's first header: the file ends cleanly before it
    assert walked(data[:boundary]) == tarfile_members(data[:boundary]) == tarfile_members(data)[:3]
    with pytest.raises(tarfile.ReadError):  # a long-name record with no member after it
        tarfile_members(data[:offset_data - 512])
    with pytest.raises(tarfile.ReadError):
        walked(data[:offset_data - 512])
    for junk in (b"\x93NUMPY" + bytes(600), b"not a tar at all" * 64):
        with pytest.raises(tarfile.ReadError):
            tarfile_members(junk)
        with pytest.raises(tarfile.ReadError):
            walked(junk)
    assert walked(b"") == [] and walked(bytes(1024)) == []


def test_damage_in_an_extended_header_or_a_negative_size_ends_the_walk_instead_of_hanging():
    # pax data carries no checksum: a record length of 0 or less must not make the walk spin on it
    for record in (b"0 path=x\n", b"-9 path=x\n", b"5 path=xyz\n", b"x path=y\n"):
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, len(record)
        data = info.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\0") + make_tar(tarfile.USTAR_FORMAT)
        with pytest.raises(tarfile.ReadError):
            walked(data)
    # a header whose size field says -512 (base-256) and whose checksum is right: tarfile walks back onto it
    # forever; the walk ends there, and a reader then finds fewer samples than expected
    data = bytearray(make_tar(tarfile.GNU_FORMAT))
    name, offset, _, _ = tarfile_members(bytes(data))[1]
    header = bytearray(data[offset:offset + 512])
    header[124:136] = b"\xff" + (-512 % (1 << 88)).to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()
    data[offset:offset + 512] = header
    assert [m[0] for m in walked(bytes(data))] == [tarfile_members(make_tar(tarfile.GNU_FORMAT))[0][0]]

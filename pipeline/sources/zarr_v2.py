"""Arrays of a small in-memory Zarr v2 store, decoded with numcodecs directly.

A WebDataset release member (`pipeline.sources.zarr_member`) is a whole Zarr v2 store of a
few megabytes in one zip: about 20 entries, consolidated metadata, blosc-compressed
chunks. Opening it through xarray and zarr costs ~20 ms a member, most of it in their
per-array machinery (zarr's event-loop round trips, xarray's lazy indexing), against ~3 ms
to decompress its chunks: for the releases' 250k locations x 2 modalities that overhead was
most of the job. This module reads the arrays the way the Zarr v2 specification lays them
out (``.zmetadata``'s ``metadata``: ``<name>/.zarray`` with shape, chunks, dtype, compressor,
filters, fill_value, order, dimension_separator; chunk ``<name>/<i>.<j>...``), with
numcodecs, zarr's own codec library, doing every decompression.

It reads only what it can read exactly as xarray's zarr backend would (`ArrayReader.read`):
anything else (filters, object dtypes, a missing chunk, an attribute that xarray would
decode: scale_factor, add_offset, _FillValue, missing_value, or a fill_value other than a
float array's NaN, which xarray would mask) raises `Unsupported`, and the caller opens the member with xarray
instead. ``time``'s CF encoding (``units``, ``calendar``) is decoded by xarray's own
`decode_cf_datetime`.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, Mapping, Optional

import numpy as np

_DECODED_BY_XARRAY = ("scale_factor", "add_offset", "_FillValue", "missing_value", "_Unsigned", "_Encoding", "dtype")
"""Attributes under which xarray's CF decoding would change an array's values or dtype."""


class Unsupported(Exception):
    """The store uses something this reader does not read (the caller falls back to xarray)."""


class ArrayReader:
    """The arrays of one consolidated Zarr v2 store held as ``{key: bytes}``."""

    def __init__(self, entries: Mapping[str, bytes]):
        self.entries = entries
        try:
            consolidated = json.loads(entries[".zmetadata"])
            self.meta: dict[str, Any] = consolidated["metadata"]
        except (KeyError, ValueError, TypeError) as err:
            raise Unsupported(f"no consolidated metadata ({type(err).__name__}: {err})") from err

    def __contains__(self, name: str) -> bool:
        return f"{name}/.zarray" in self.meta

    def attrs(self, name: str) -> dict[str, Any]:
        return dict(self.meta.get(f"{name}/.zattrs", {}))

    def read(self, name: str, time: bool = False) -> np.ndarray:
        """The whole array ``name`` as stored (shape, dtype), or as datetime64[ns] when ``time`` (CF ``units``)."""
        import numcodecs

        zarray = self.meta.get(f"{name}/.zarray")
        if zarray is None:
            raise KeyError(name)
        if zarray.get("zarr_format") != 2:
            raise Unsupported(f"{name}: zarr_format {zarray.get('zarr_format')}")
        attrs = self.attrs(name)
        cf = {k for k in attrs if k in _DECODED_BY_XARRAY}
        if cf or (not time and ("units" in attrs and "since" in str(attrs["units"]))):
            raise Unsupported(f"{name}: attributes {sorted(cf) or ['units']} are decoded by xarray")
        dtype = np.dtype(zarray["dtype"]) if not isinstance(zarray["dtype"], list) else None
        if dtype is None or dtype.hasobject or dtype.fields is not None:
            raise Unsupported(f"{name}: dtype {zarray['dtype']}")
        fill = zarray.get("fill_value")
        if fill is not None and not (dtype.kind in "fc" and _is_nan(fill)):
            # xarray masks a fill value (a NaN fill of a float array masks NaN with NaN: no change)
            raise Unsupported(f"{name}: fill_value {fill!r} (xarray would mask it)")
        if zarray.get("filters"):
            raise Unsupported(f"{name}: filters {zarray['filters']}")
        order = zarray.get("order", "C")
        if order not in ("C", "F"):
            raise Unsupported(f"{name}: order {order}")
        shape, chunks = tuple(zarray["shape"]), tuple(zarray["chunks"])
        sep = zarray.get("dimension_separator") or "."
        codec = numcodecs.get_codec(zarray["compressor"]) if zarray.get("compressor") else None
        out = np.empty(shape, dtype)
        grid = [range(math.ceil(s / c)) if c else range(1) for s, c in zip(shape, chunks)]
        for index in itertools.product(*grid) if shape else [()]:
            key = f"{name}/{sep.join(str(i) for i in index) if index else '0'}"
            raw = self.entries.get(key)
            if raw is None:
                raise Unsupported(f"{name}: chunk {key} is missing (the fill value would stand in)")
            data = codec.decode(raw) if codec is not None else raw
            chunk = np.frombuffer(data, dtype)
            if chunk.size != math.prod(chunks):
                raise ValueError(f"{key}: {chunk.size} values, expected {math.prod(chunks)} for chunks {chunks}")
            chunk = chunk.reshape(chunks, order=order)
            where = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
            out[where] = chunk[tuple(slice(0, w.stop - w.start) for w in where)]
        if time:
            return _datetimes(out, attrs)
        return out


def _is_nan(value: Any) -> bool:
    """True for the NaN of a fill_value as Zarr v2 JSON writes it ('NaN') or as a float."""
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _datetimes(values: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """datetime64[ns] of CF-encoded times (``units`` 'nanoseconds since 1970-01-01', ``calendar``), by xarray."""
    from xarray.coding.times import decode_cf_datetime

    units: Optional[str] = attrs.get("units")
    if values.dtype.kind == "M":
        return values.astype("datetime64[ns]")
    if not units or "since" not in units:
        raise Unsupported(f"times without CF units ({units!r})")
    return np.asarray(decode_cf_datetime(values, units, attrs.get("calendar", "standard"))).astype("datetime64[ns]")

"""Whole-shard reads and writes at the speed of the bytes, for arrays stored as plain bytes.

An uncompressed array with one Zarr chunk per shard (the default layout) keeps each shard in one file
that is nothing but the chunk's values in C order (Zarr 3's ``bytes`` codec, little endian). Going
through Zarr's async codec pipeline costs a thread hop, a buffer copy and per-call overhead for every
shard (whole-store reads ran at 0.06-0.4x ``np.load`` on the same bytes); reading the file with
``readinto`` straight into the caller's array, and writing it with one ``write`` of the buffer, does what
``np.load``/``np.save`` do. The file written here is byte for byte what Zarr writes (a test reads it back
through Zarr), under a temp name that the writer renames onto the chunk (atomic, as Zarr's own writes).
Compressed or sharded arrays go through Zarr.
On object storage (``store.objects``) a raw shard is one object, read with one GET straight into the array.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.buffer.cpu import NDBuffer

from foundation.atomic import temp_path
from store.schema import fill_nan

_NATIVE = sys.byteorder  # "little" on every platform numpy ships wheels for


def is_raw(arr: zarr.Array) -> bool:
    """True when each clip-axis chunk of ``arr`` is one plain file of C-order values in native byte order."""
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec) or arr.shards is not None:
        return False
    endian = codecs[0].endian
    if arr.dtype.itemsize > 1 and (endian is None or endian.value != _NATIVE):
        return False
    return tuple(arr.chunks[1:]) == tuple(arr.shape[1:])


def _readinto(fd: int, view: memoryview, offset: int) -> int:
    """Reads ``len(view)`` bytes at ``offset`` into ``view`` (loops over short reads); returns bytes read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def read_raw_rows(
    path: Path,
    out: np.ndarray,
    *,
    row_shape: Sequence[int],
    fill_value: float,
    axis1: Sequence[int] | None = None,
) -> np.ndarray:
    """The first ``len(out)`` rows of a raw chunk file (rows of the stored shape ``row_shape``) into
    ``out``, optionally only the positions ``axis1`` of axis 1. A missing file (nothing written to that
    shard yet) reads as ``fill_value``.

    ``out`` must be C-contiguous; a selection on axis 1 reads each contiguous run of selected positions
    per row with one ``pread`` straight into ``out`` (no whole-shard read, no copy).
    """
    if not out.flags.c_contiguous:
        raise ValueError("read_raw_rows: out must be C-contiguous")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        _fill(out, fill_value)
        return out
    try:
        flat = memoryview(out).cast("B") if out.nbytes else memoryview(b"")
        if axis1 is None:
            if _readinto(fd, flat, 0) != flat.nbytes:
                raise OSError(f"{path}: chunk file is shorter than the {len(out)} rows asked for")
            return out
        inner = out.itemsize * int(np.prod(row_shape[1:], dtype=np.int64))
        row_file = inner * int(row_shape[0])
        runs = _runs([int(a) for a in axis1])
        dst = 0
        for r in range(len(out)):
            for first, count in runs:
                view = flat[dst : dst + count * inner]
                if _readinto(fd, view, r * row_file + first * inner) != len(view):
                    raise OSError(f"{path}: chunk file is shorter than row {r} needs")
                dst += count * inner
        return out
    finally:
        os.close(fd)


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """``[0, 1, 2, 5, 6]`` -> ``[(0, 3), (5, 2)]``: contiguous runs as (first, count), in the given order."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def read_raw_object(
    objects: Any,  # a store.objects.ObjectIO (this module does not import it)
    key: str,
    out: np.ndarray,
    *,
    row_shape: Sequence[int],
    fill_value: float,
    axis1: Sequence[int] | None = None,
) -> np.ndarray:
    """``fastio.read_raw_rows`` for a chunk object: the whole object in one GET, or with ``axis1`` only
    the selected runs of each row (one concurrent multi-range request). A missing object reads as fill."""
    flat = memoryview(out).cast("B") if out.nbytes else memoryview(b"")
    if axis1 is None:
        data = objects.get(key)
        if data is None:
            return _fill(out, fill_value)
        if len(data) < flat.nbytes:
            raise OSError(f"{objects.url}/{key}: chunk object is shorter than the {len(out)} rows asked for")
        flat[:] = memoryview(data)[: flat.nbytes]
        return out
    inner = out.itemsize * int(np.prod(row_shape[1:], dtype=np.int64))
    row_file = inner * int(row_shape[0])
    starts, ends = [], []
    for r in range(len(out)):
        for first, count in _runs([int(a) for a in axis1]):
            starts.append(r * row_file + first * inner)
            ends.append(starts[-1] + count * inner)
    parts = objects.get_ranges(key, starts, ends)
    if parts is None:
        return _fill(out, fill_value)
    dst = 0
    for part, start, end in zip(parts, starts, ends, strict=True):
        if len(part) != end - start:
            raise OSError(f"{objects.url}/{key}: chunk object is shorter than its rows need")
        flat[dst : dst + len(part)] = memoryview(part)
        dst += len(part)
    return out


def raw_object_view(objects: Any, key: str, rows: int, arr: Any) -> np.ndarray:
    """The first ``rows`` rows of a chunk object as a read-only array over the bytes of one GET (fill
    values when the object does not exist)."""
    shape = (rows, *arr.shape[1:])
    data = objects.get(key)
    if data is None:
        return np.full(shape, arr.fill_value, dtype=arr.dtype)
    flat = np.frombuffer(data, dtype=arr.dtype)
    needed = int(np.prod(shape, dtype=np.int64))
    if flat.size < needed:
        raise OSError(f"{objects.url}/{key}: chunk object is shorter than the {rows} rows asked for")
    return flat[:needed].reshape(shape)


def stage_raw_chunk(path: Path, data: np.ndarray, chunk_rows: int, fill_value: float) -> Path:
    """Writes ``data`` (the first rows of a chunk of ``chunk_rows`` rows; the rest is ``fill_value``, as
    Zarr pads an edge chunk) as a raw chunk file under the temp name beside ``path`` (one write) and
    returns that name: the caller fsyncs it and renames it onto ``path`` when the commit order says so
    (``ShardWriter.commit``). A failed write removes the temp file."""
    data = np.ascontiguousarray(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, memoryview(data).cast("B"))
            if len(data) < chunk_rows:
                pad = _fill(np.empty((chunk_rows - len(data), *data.shape[1:]), dtype=data.dtype), fill_value)
                _write_all(fd, memoryview(pad).cast("B"))
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def raw_chunk_bytes(data: np.ndarray, chunk_rows: int, fill_value: float) -> np.ndarray:
    """The whole chunk as one contiguous array: ``data`` and, for an edge chunk, fill rows after it."""
    data = np.ascontiguousarray(data)
    if len(data) >= chunk_rows:
        return data
    pad = _fill(np.empty((chunk_rows - len(data), *data.shape[1:]), dtype=data.dtype), fill_value)
    return np.concatenate([data, pad])


def _fill(arr: np.ndarray, value: float) -> np.ndarray:
    """``arr[...] = value``, with NaN written as its bit pattern (``schema.fill_nan``: ~3x faster)."""
    if arr.dtype.kind == "f" and np.isnan(value):
        return fill_nan(arr)
    arr[...] = value
    return arr


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def read_shard(
    store: Any,  # a FeatureStore (this module does not import feature_store)
    name: str,
    shard: int,
    out: np.ndarray | None = None,
    axis1: Sequence[int] | None = None,
    read_only: bool = False,
) -> np.ndarray:
    """Reads one whole shard of an array (only positions ``axis1`` of axis 1 when given), into ``out``
    when given. Plain-bytes shard files are read straight into the array (``store.fastio``).
    ``read_only=True`` (and no ``out``) lets a whole shard from object storage be returned as a read-only
    view of the GET's own buffer: one copy less per shard (a stage-2 epoch's reader only reads it)."""
    clips = store.clips_in_shard(shard)
    arr = store.array(name)
    if axis1 is not None and list(axis1) == list(range(arr.shape[1])):
        axis1 = None  # every position in order: the whole rows (one read, one GET)
    if read_only and out is None and axis1 is None and is_raw(arr) and store.objects is not None:
        return raw_object_view(store.objects, store.chunk_key(name, shard), len(clips), arr)
    if out is None:
        shape = [len(clips), *arr.shape[1:]]
        if axis1 is not None:
            shape[1] = len(axis1)
        out = np.empty(shape, dtype=arr.dtype)
    if is_raw(arr):
        if store.objects is not None:  # on object storage: one GET (or one multi-range GET) per shard
            key = store.chunk_key(name, shard)
            return read_raw_object(
                store.objects, key, out, row_shape=arr.shape[1:], fill_value=arr.fill_value, axis1=axis1
            )
        path = store.chunk_file(name, shard)
        return read_raw_rows(path, out, row_shape=arr.shape[1:], fill_value=arr.fill_value, axis1=axis1)
    if axis1 is None:
        arr.get_basic_selection((slice(clips.start, clips.stop),), out=NDBuffer.from_numpy_array(out))
    else:
        out[...] = arr.get_orthogonal_selection((slice(clips.start, clips.stop), list(axis1)))
    return out

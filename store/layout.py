"""A store's layout (shapes, shards, chunking, compression) and building an empty store on disk."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from store.atomic import fsync_tree
from store.schema import (
    LOCK_DIR,
    STRING_DTYPE,
    StoreError,
)

SCHEMA_VERSION = 1
ATTRS_KEY = "amflow_store"
DATA_ARRAYS = ("embeddings", "flow", "cls")
SHARD_TARGET_BYTES = 32 * 2**20
MAX_SHARD_CLIPS = 1024
TABLE_CHUNK = 65536
FLOAT_DTYPES = ("float16", "float32")
DIMENSION_NAMES = {
    "embeddings": ("clip", "adapter", "view", "frame", "feature"),
    "flow": ("clip", "block", "view", "frame", "head", "token"),
    "cls": ("clip", "view", "feature"),
}
# Shard files side by side (``<array>/c.<shard>.0.0.0``), not nested folders (``c/<shard>/0/0/0``): a
# commit then makes one new file durable with two fsyncs (file, folder) instead of one per new folder.
FLAT_CHUNK_KEYS = {"name": "default", "separator": "."}
ADDED_PROVENANCE_KEYS = ("amflow_version", "created", "schema_version")


def parse_compression(spec: str) -> tuple[str, list[Any] | None]:
    """``"none" | "zstd[:level]" | "blosc[:level]"`` -> (normalised spec, zarr compressors)."""
    name, _, level_text = str(spec).strip().lower().partition(":")
    defaults = {"zstd": 3, "blosc": 5}
    if name == "none" and not level_text:
        return "none", None
    if name not in defaults:
        raise StoreError(f"compression={spec!r}: expected 'none', 'zstd[:level]' or 'blosc[:level]'")
    try:
        level = int(level_text) if level_text else defaults[name]
    except ValueError as e:
        raise StoreError(f"compression={spec!r}: the level after ':' must be an integer") from e
    if name == "zstd":
        if not 1 <= level <= 22:
            raise StoreError(f"compression={spec!r}: zstd level must be in 1..22")
        return f"zstd:{level}", [ZstdCodec(level=level)]
    if not 0 <= level <= 9:
        raise StoreError(f"compression={spec!r}: blosc level must be in 0..9")
    return f"blosc:{level}", [BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")]


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Shapes and storage settings of a store; everything needed to build its arrays."""

    num_clips: int
    num_adapters: int
    num_views: int
    num_frames: int
    embed_dim: int
    cls_dim: int
    flow_shape: tuple[int, int, int] | None  # (flow_blocks, heads, tokens); None = no flow array
    dtype: str
    shard_clips: int
    chunk_clips: int  # clips per Zarr chunk inside a shard (= shard_clips: one chunk per shard file)
    compression: str

    def __post_init__(self) -> None:
        for name in (
            "num_clips",
            "num_adapters",
            "num_views",
            "num_frames",
            "embed_dim",
            "cls_dim",
            "shard_clips",
            "chunk_clips",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise StoreError(f"{name}={value!r}: expected a positive integer")
        if self.flow_shape is not None:
            fs = tuple(int(x) for x in self.flow_shape)
            if len(fs) != 3 or min(fs) < 1:
                raise StoreError(
                    f"flow_shape={self.flow_shape!r}: expected (flow_blocks, heads, tokens) > 0 or None"
                )
            object.__setattr__(self, "flow_shape", fs)
        if self.shard_clips % self.chunk_clips:
            raise StoreError(
                f"chunk_clips={self.chunk_clips}: must divide shard_clips={self.shard_clips} "
                "(a chunk never straddles two shards)"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise StoreError(f"dtype={self.dtype!r}: expected one of {FLOAT_DTYPES}")
        object.__setattr__(self, "compression", parse_compression(self.compression)[0])

    @property
    def num_shards(self) -> int:
        """Number of shards along the clip axis (the last one may be partial)."""
        return math.ceil(self.num_clips / self.shard_clips)

    def clip_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-clip shape of each float array stored (``flow`` only when the store has one)."""
        shapes = {
            "embeddings": (self.num_adapters, self.num_views, self.num_frames, self.embed_dim),
            "cls": (self.num_views, self.cls_dim),
        }
        if self.flow_shape is not None:
            blocks, heads, tokens = self.flow_shape
            shapes["flow"] = (blocks, self.num_views, self.num_frames, heads, tokens)
        return {name: shapes[name] for name in DATA_ARRAYS if name in shapes}

    def clip_bytes(self) -> int:
        """Bytes of one clip's float data (all arrays) in the stored dtype."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum(math.prod(s) * itemsize for s in self.clip_shapes().values())

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored in the attributes."""
        d = dataclasses.asdict(self)
        d["flow_shape"] = list(self.flow_shape) if self.flow_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreLayout:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["flow_shape"] = tuple(d["flow_shape"]) if d.get("flow_shape") is not None else None
        return cls(**d)


def default_shard_clips(clip_bytes: int) -> int:
    """Power of two with about 32 MiB of float data per shard, in [1, 1024] clips."""
    n = max(1, SHARD_TARGET_BYTES // max(1, clip_bytes))
    return int(min(MAX_SHARD_CLIPS, 2 ** int(math.log2(n))))


def check_free_space(path: Path, needed: int) -> None:
    """Refuses (StoreError) to write about ``needed`` bytes at ``path`` when its filesystem has less free."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise StoreError(
            f"{path}: not enough free space ({free / 2**20:.1f} MiB free on {parent}, about "
            f"{needed / 2**20:.1f} MiB needed); nothing is left behind"
        )


def is_store(path: str | Path) -> bool:
    """True when ``path`` holds an amflow feature store (a Zarr group with our attributes)."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return ATTRS_KEY in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _resolve_names(what: str, names: Sequence[str] | None, count: int, default_prefix: str) -> list[str]:
    if names is None:
        return [f"{default_prefix}{i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise StoreError(f"{what}: expected {count} names, got {len(names)}")
    if len(set(names)) != len(names):
        raise StoreError(f"{what}: names must be unique, got {names}")
    return names


def _validate_table(
    clip_ids: Sequence[str] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(clip_ids, dtype=STRING_DTYPE)
    labs = np.asarray(labels)
    if ids.ndim != 1 or len(ids) == 0:
        raise StoreError(
            f"clip_ids: expected a non-empty 1-D list of relative video paths, got shape {ids.shape}"
        )
    if labs.shape != ids.shape:
        raise StoreError(f"labels: expected {len(ids)} labels (one per clip id), got shape {labs.shape}")
    if not np.issubdtype(labs.dtype, np.integer):
        raise StoreError(f"labels: expected integers (-1 = unlabelled), got dtype {labs.dtype}")
    labs = labs.astype(np.int64)
    if (labs < -1).any():
        raise StoreError(f"labels: values must be >= -1 (-1 = unlabelled), got {int(labs.min())}")
    empty = np.flatnonzero(np.strings.str_len(ids) == 0)
    if len(empty):
        raise StoreError(f"clip_ids: empty id at index {int(empty[0])}")
    if len(np.unique(ids)) != len(ids):
        u, counts = np.unique(ids, return_counts=True)
        raise StoreError(f"clip_ids: ids must be unique, {u[counts > 1][0]!r} appears {counts.max()} times")
    return ids, labs


def array_definitions(layout: StoreLayout) -> dict[str, dict[str, Any]]:
    """``zarr.Group.create_array`` arguments of every array of a store: how the store is built, and how
    ``store repair`` rebuilds an array's damaged ``zarr.json`` (the layout in the attributes defines it)."""
    _, compressors = parse_compression(layout.compression)
    # One chunk per shard is stored without the sharding codec (same file, one copy less on read).
    sharded = layout.chunk_clips < layout.shard_clips
    defs: dict[str, dict[str, Any]] = {}
    for name, shape in layout.clip_shapes().items():
        defs[name] = dict(
            shape=(layout.num_clips, *shape),
            dtype=layout.dtype,
            chunks=(layout.chunk_clips, *shape),
            shards=(layout.shard_clips, *shape) if sharded else None,
            compressors=compressors,
            fill_value=np.nan,
            dimension_names=DIMENSION_NAMES[name],
            chunk_key_encoding=FLAT_CHUNK_KEYS,
        )
    table_chunk = min(layout.num_clips, TABLE_CHUNK)
    defs["labels"] = dict(shape=(layout.num_clips,), dtype="int64", chunks=(table_chunk,), fill_value=-1)
    defs["clip_ids"] = dict(shape=(layout.num_clips,), dtype=str, chunks=(table_chunk,))
    defs["status"] = dict(
        shape=(layout.num_clips,),
        dtype="int8",
        chunks=(layout.shard_clips,),
        fill_value=0,
        compressors=None,
        chunk_key_encoding=FLAT_CHUNK_KEYS,
    )
    for name in ("failure_type", "failure_message"):
        defs[name] = dict(
            shape=(layout.num_clips,),
            dtype=str,
            chunks=(layout.shard_clips,),
            chunk_key_encoding=FLAT_CHUNK_KEYS,
        )
    return defs


def build_empty_store(
    root: Path, layout: StoreLayout, attrs: Mapping[str, Any], ids: np.ndarray, labs: np.ndarray
) -> None:
    """Builds an empty store (arrays, clip table, attributes) in ``root``; callers rename it into place."""
    group = zarr.open_group(LocalStore(root), mode="w", zarr_format=3)
    for name, definition in array_definitions(layout).items():
        group.create_array(name, **definition)
    group["labels"][:] = labs
    group["clip_ids"][:] = ids
    (root / LOCK_DIR).mkdir(exist_ok=True)
    group.attrs.put({ATTRS_KEY: dict(attrs)})
    fsync_tree(root)


def _stale_creation_dirs(path: Path) -> list[Path]:
    """Temp folders of earlier ``create`` calls on this host whose process is gone (killed mid-create)."""
    out = []
    prefix = f".{path.name}.creating-{socket.gethostname()}-"
    for p in path.parent.glob(f".{path.name}.creating-*"):
        pid = p.name[len(prefix) :].split("-")[0] if p.name.startswith(prefix) else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                out.append(p)
            except PermissionError:
                pass
    return out

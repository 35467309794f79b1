"""A store's layout (shapes, shards, chunking, compression) and building an empty store on disk."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from foundation.atomic import fsync_tree
from store.objects import ObjectIO, StoreURL, is_url
from store.schema import (
    LOCK_DIR,
    STRING_DTYPE,
    StoreError,
)

SCHEMA_VERSION = 2
# Versions this amflow reads: 1 (one flow map shape for every block, its grid in the provenance) is
# upgraded on opening (``StoreLayout.from_dict``) and read-only.
READABLE_SCHEMA_VERSIONS = (1, 2)
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
# Flow blocks of different map shapes (hierarchical backbones) are packed along one axis, block after
# block, each block's (channels, tokens) map flattened: ``FlowBlock.offsets`` says where each lies.
PACKED_FLOW_DIMENSIONS = ("clip", "view", "frame", "map")
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
class FlowBlock:
    """The geometry of one flow block's stored maps: ``channels`` values per token (h heads for AM flow,
    1 for the feature-difference control) over ``tokens`` tokens per frame, ``prefix_tokens`` (CLS,
    registers) first, then the patch ``grid`` (rows, cols); the block's attention ``heads`` and ``width``.

    Stores of schema 1 did not record ``heads`` and ``width`` (None), nor the grid when their provenance
    lacks it."""

    channels: int
    tokens: int
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0
    heads: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        for name in ("channels", "tokens", "prefix_tokens", "heads", "width"):
            value = getattr(self, name)
            low = 0 if name == "prefix_tokens" else 1
            if value is None and name in ("heads", "width"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise StoreError(f"flow block {name}={value!r}: expected an integer >= {low}")
            object.__setattr__(self, name, int(value))
        if self.grid is not None:
            grid = tuple(int(g) for g in self.grid)
            if len(grid) != 2 or min(grid) < 1 or self.prefix_tokens + grid[0] * grid[1] != self.tokens:
                raise StoreError(
                    f"flow block grid={self.grid!r}: expected (rows, cols) with prefix_tokens "
                    f"{self.prefix_tokens} + rows*cols = tokens {self.tokens}"
                )
            object.__setattr__(self, "grid", grid)

    @property
    def map_size(self) -> int:
        """Values per frame: channels x tokens."""
        return self.channels * self.tokens

    @property
    def map_shape(self) -> tuple[int, int]:
        """(channels, tokens): one frame's map."""
        return self.channels, self.tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON form (in the store's layout, and in trained heads' metadata)."""
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowBlock:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "grid": tuple(d["grid"]) if d.get("grid") else None})


def flow_offsets(blocks: Sequence[FlowBlock]) -> list[tuple[int, int]]:
    """(start, stop) of each block's flattened map along the packed flow axis."""
    stops = np.cumsum([b.map_size for b in blocks]).tolist()
    return [(stop - b.map_size, stop) for b, stop in zip(blocks, stops)]


def uniform_flow(blocks: Sequence[FlowBlock]) -> bool:
    """Whether every block's map has the same (channels, tokens): stored as one (blocks, h, N) axis set."""
    return len({b.map_shape for b in blocks}) == 1


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Shapes and storage settings of a store; everything needed to build its arrays."""

    num_clips: int
    num_adapters: int
    num_views: int
    num_frames: int
    embed_dim: int
    cls_dim: int
    flow_blocks: tuple[FlowBlock, ...] | None  # per flow block its map geometry; None = no flow array
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
        if self.flow_blocks is not None:
            blocks = tuple(self.flow_blocks)
            if not blocks or not all(isinstance(b, FlowBlock) for b in blocks):
                raise StoreError(f"flow_blocks={self.flow_blocks!r}: expected a non-empty list of FlowBlock")
            object.__setattr__(self, "flow_blocks", blocks)
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
        if self.flow_blocks is not None:
            if self.flow_shape is not None:
                blocks, heads, tokens = self.flow_shape
                shapes["flow"] = (blocks, self.num_views, self.num_frames, heads, tokens)
            else:
                total = sum(b.map_size for b in self.flow_blocks)
                shapes["flow"] = (self.num_views, self.num_frames, total)
        return {name: shapes[name] for name in DATA_ARRAYS if name in shapes}

    @property
    def flow_shape(self) -> tuple[int, int, int] | None:
        """(flow_blocks, channels, tokens) when every flow block's map has one shape (the flow array is
        then (clips, blocks, V, T, h, N)); None without flow or for packed maps of different shapes."""
        if self.flow_blocks is None or not uniform_flow(self.flow_blocks):
            return None
        return (len(self.flow_blocks), *self.flow_blocks[0].map_shape)

    @property
    def flow_packed(self) -> bool:
        """Whether the flow maps are packed along one axis (blocks of different map shapes)."""
        return self.flow_blocks is not None and self.flow_shape is None

    def clip_bytes(self) -> int:
        """Bytes of one clip's float data (all arrays) in the stored dtype."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum(math.prod(s) * itemsize for s in self.clip_shapes().values())

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored in the attributes."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["flow_blocks"] = [b.to_dict() for b in self.flow_blocks] if self.flow_blocks is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> StoreLayout:
        """Inverse of :meth:`to_dict`; a schema-1 layout (``flow_shape``: one (blocks, heads, tokens)
        for all) is upgraded, its grid and prefix tokens read from the ``provenance`` it recorded them in."""
        d = dict(d)
        if "flow_shape" in d:
            shape = d.pop("flow_shape")
            prov = provenance or {}
            grid, prefix = prov.get("patch_grid"), prov.get("num_prefix_tokens")
            if shape is None:
                d["flow_blocks"] = None
            else:
                count, channels, tokens = (int(x) for x in shape)
                prefix = 1 if prefix is None else int(prefix)  # schema 1's readers assumed one CLS
                d["flow_blocks"] = [dict(channels=channels, tokens=tokens, grid=grid, prefix_tokens=prefix)]
                d["flow_blocks"] *= count
        if d.get("flow_blocks") is not None:
            d["flow_blocks"] = tuple(FlowBlock.from_dict(b) for b in d["flow_blocks"])
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


def is_store(path: str | Path | StoreURL) -> bool:
    """True when ``path`` (a folder or an ``s3://`` URL) holds an amflow feature store (a Zarr group with
    our attributes). An object store that cannot be reached raises a one-line StoreError."""
    try:
        if is_url(path):
            data = ObjectIO(StoreURL.parse(path)).get("zarr.json")
            if data is None:
                return False
            text = bytes(data).decode()
        else:
            meta = Path(path) / "zarr.json"
            if not meta.is_file():
                return False
            text = meta.read_text()
        return ATTRS_KEY in json.loads(text).get("attributes", {})
    except (OSError, ValueError) as e:
        if isinstance(e, StoreError):
            raise
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
        dimension_names = PACKED_FLOW_DIMENSIONS if name == "flow" and layout.flow_packed else None
        defs[name] = dict(
            shape=(layout.num_clips, *shape),
            dtype=layout.dtype,
            chunks=(layout.chunk_clips, *shape),
            shards=(layout.shard_clips, *shape) if sharded else None,
            compressors=compressors,
            fill_value=np.nan,
            dimension_names=dimension_names or DIMENSION_NAMES[name],
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
    root: Path | ObjectIO,
    layout: StoreLayout,
    attrs: Mapping[str, Any],
    ids: np.ndarray,
    labs: np.ndarray,
    fill: Callable[[zarr.Group], None] | None = None,
) -> None:
    """Builds an empty store (arrays, clip table, attributes) in ``root``; callers rename it into place.
    On object storage (an ``ObjectIO``) it is built in place: the attributes, written last, make it one;
    ``fill(group)`` writes the arrays' data before them (``store import``: all of it is there, or no store).
    """
    remote = isinstance(root, ObjectIO)
    zstore = root.zarr_store(read_only=False) if remote else LocalStore(root)
    group = zarr.open_group(zstore, mode="a" if remote else "w", zarr_format=3)
    for name, definition in array_definitions(layout).items():
        group.create_array(name, **definition)
    group["labels"][:] = labs
    group["clip_ids"][:] = ids
    if not remote:
        (root / LOCK_DIR).mkdir(exist_ok=True)
    if fill is not None:
        fill(group)
    group.attrs.put({ATTRS_KEY: dict(attrs)})
    if not remote:
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

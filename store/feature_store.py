"""The feature store: a Zarr 3 cache of stage-1 features that survives crashes and scales out by shards.

Layout, write protocol and crash guarantees are documented in ``store/SCHEMA.md``. In short: every
per-clip array is split along the clip axis into shards of ``shard_clips`` clips (the same clips for every
array); a writer owns whole shards; a clip's status flips to done only after its data is durable on disk.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from foundation.atomic import fsync_path, fsync_tree
from store.fastio import is_raw, read_shard
from store.fingerprint import MISSING as MISSING
from store.fingerprint import canonical_json, compute_fingerprint, fingerprint_differences, package_version
from store.fingerprint import check_fingerprint as check_fingerprint
from store.fingerprint import config_differences as config_differences
from store.fingerprint import flatten_dotted as flatten_dotted
from store.layout import (
    ADDED_PROVENANCE_KEYS,
    ATTRS_KEY,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    FlowBlock,
    StoreLayout,
    _resolve_names,
    _stale_creation_dirs,
    _validate_table,
    array_definitions,
    build_empty_store,
    check_free_space,
    default_shard_clips,
    is_store,
)
from store.layout import DATA_ARRAYS as DATA_ARRAYS
from store.objects import LEASE_SECONDS, ObjectIO, ObjectLease, StoreURL, is_url
from store.schema import (
    LOCK_DIR,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_MISSING,
    STRING_DTYPE,
    FingerprintMismatch,
    NotAStoreError,
    ReadOnlyStoreError,
    ShardBusyError,
    StoreError,
)
from store.schema import NonFiniteFeaturesError as NonFiniteFeaturesError
from store.schema import nonfinite_mask as nonfinite_mask
from store.writer import ShardWriter, SpareBuffers

if TYPE_CHECKING:
    import dask.array

log = logging.getLogger(__name__)

CREATE_LEASE = f"{LOCK_DIR}/create.lock"
CREATE_LEASE_MARK = f"{LOCK_DIR}/creating"  # present while a store is being built on object storage


class FeatureStore:
    """An opened feature store; use :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(
        self, path: Path | StoreURL, group: zarr.Group, read_only: bool, objects: ObjectIO | None = None
    ) -> None:
        self.path = path
        self.objects = objects  # the store's objects when it lives on object storage (None: a folder)
        self.read_only = read_only
        self._group = group
        meta = dict(group.attrs[ATTRS_KEY])
        if meta.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise StoreError(
                f"{path}: schema version {meta.get('schema_version')!r} is not supported (this amflow "
                f"{package_version()} reads versions {READABLE_SCHEMA_VERSIONS}); re-extract it with "
                "amflow extract"
            )
        self._meta = meta
        self.layout = StoreLayout.from_dict(meta["layout"], meta.get("provenance"))
        self._check_clip_count()
        self._arrays: dict[str, zarr.Array] = {}
        self._clip_ids: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._id_order: np.ndarray | None = None
        self._sorted_keys: np.ndarray | None = None
        self.spare_buffers = SpareBuffers()  # closed shard writers' buffers, for the next writers

    def _check_clip_count(self) -> None:
        """The layout's clip count must be the status array's: an edited or damaged ``zarr.json`` cannot
        make a reader allocate for clips the store does not hold."""
        try:
            status = self._group["status"]
        except KeyError:
            return  # a missing array is named by verify and by the reader that needs it
        if tuple(status.shape[:1]) != (self.layout.num_clips,):
            raise StoreError(
                f"{self.path}/zarr.json: its layout says {self.layout.num_clips} clips but the status array "
                f"holds {status.shape[0] if status.shape else 0}: a damaged or edited store"
            )

    # ------------------------------------------------------------------ opening / creating
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Opens an existing store read-only (``"r"``) or for writing (``"r+"``)."""
        if mode not in ("r", "r+"):
            raise StoreError(f"mode={mode!r}: expected 'r' (read-only) or 'r+' (read and write)")
        if is_url(path):
            return cls._open_remote(StoreURL.parse(path), mode)
        p = Path(path)
        if not is_store(p):
            why = "does not exist" if not p.exists() else "has no zarr.json with amflow_store attributes"
            raise NotAStoreError(f"{p}: not an amflow feature store ({why})")
        group = zarr.open_group(LocalStore(p, read_only=mode == "r"), mode=mode, zarr_format=3)
        return cls(p, group, read_only=mode == "r")

    @classmethod
    def _open_remote(cls, url: StoreURL, mode: str) -> FeatureStore:
        objects = ObjectIO(url)
        if not is_store(url):
            empty = next(objects.list(), None) is None  # a missing bucket raises here, naming it
            why = "nothing at that prefix" if empty else "no zarr.json with amflow_store attributes there"
            raise NotAStoreError(f"{url}: not an amflow feature store ({why})")
        group = zarr.open_group(objects.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        return cls(url, group, read_only=mode == "r", objects=objects)

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        clip_ids: Sequence[str] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        num_adapters: int,
        num_views: int,
        num_frames: int,
        embed_dim: int,
        cls_dim: int,
        provenance: Mapping[str, Any],
        fingerprint_fields: Mapping[str, Any],
        flow_blocks: Sequence[FlowBlock] | None = None,
        class_names: Sequence[str] | None = None,
        dtype: str = "float16",
        shard_clips: int | None = None,
        chunk_clips: int | None = None,
        compression: str = "none",
        adapter_names: Sequence[str] | None = None,
        flow_block_names: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> FeatureStore:
        """Creates a store, or re-opens the same one for resuming (same fingerprint, clips and layout).

        ``shard_clips`` (default: ~32 MiB of data per shard) is the unit a writer owns and one file per
        array; ``chunk_clips`` (default: = shard_clips) < shard_clips splits each shard file into Zarr
        chunks so single clips can be read without reading their whole shard.

        A store at ``path`` made with another fingerprint raises :class:`FingerprintMismatch` naming the
        differing fields; other clips or shapes raise :class:`StoreError`. ``overwrite=True`` deletes an
        existing store (never a folder that is not a store) and starts afresh.

        ``flow_blocks``: per flow block the geometry of its maps (None: no flow array); ``class_names``:
        the dataset's classes, label ``i`` naming ``class_names[i]`` (None: unnamed).
        """
        path = StoreURL.parse(path) if is_url(path) else Path(path)
        ids, labs = _validate_table(clip_ids, labels)
        probe = StoreLayout(
            num_clips=len(ids),
            num_adapters=num_adapters,
            num_views=num_views,
            num_frames=num_frames,
            embed_dim=embed_dim,
            cls_dim=cls_dim,
            flow_blocks=tuple(flow_blocks) if flow_blocks is not None else None,
            dtype=dtype,
            shard_clips=shard_clips or 1,
            chunk_clips=1,
            compression=compression,
        )
        shards = shard_clips or default_shard_clips(probe.clip_bytes())
        layout = dataclasses.replace(probe, shard_clips=shards, chunk_clips=chunk_clips or shards)
        a_names = _resolve_names("adapter_names", adapter_names, num_adapters, "adapter")
        f_names = (
            _resolve_names("flow_block_names", flow_block_names, len(layout.flow_blocks), "block")
            if layout.flow_blocks is not None
            else []
        )
        fields = json.loads(canonical_json(dict(fingerprint_fields), "fingerprint_fields"))
        prov = json.loads(canonical_json(dict(provenance), "provenance"))
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(labs) and labs.max() >= len(class_names):
                raise StoreError(f"labels: {int(labs.max())} is beyond the {len(class_names)} class_names")
        clash = [k for k in ADDED_PROVENANCE_KEYS if k in prov]
        if clash:
            raise StoreError(f"provenance: keys {clash} are added by the store; do not pass them")

        prov.update(amflow_version=package_version(), created=_now(), schema_version=SCHEMA_VERSION)
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "layout": layout.to_dict(),
            "adapter_names": a_names,
            "flow_block_names": f_names,
            "class_names": class_names,
            "fingerprint": compute_fingerprint(fields),
            "fingerprint_fields": fields,
            "provenance": prov,
        }
        if isinstance(path, StoreURL):
            cls.build_remote(path, layout, attrs, ids, labs, overwrite)
        elif path.exists() and overwrite:
            if is_store(path):
                shutil.rmtree(path)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            else:
                raise StoreError(f"{path}: exists and is not an amflow feature store; refusing to delete it")
        if isinstance(path, Path) and (not path.exists() or (path.is_dir() and not any(path.iterdir()))):
            needed = layout.num_clips * layout.clip_bytes()
            if layout.compression == "none":
                check_free_space(path, needed)
            if cls._build_and_move(path, layout, attrs, ids, labs):
                return cls.open(path, mode="r+")
        # An existing store (or one a concurrent writer just created): resume it if it is the same.
        if not is_store(path):
            raise StoreError(f"{path}: exists and is not an amflow feature store; refusing to write into it")
        store = cls.open(path, mode="r+")
        store._check_same(layout, shard_clips, chunk_clips, a_names, f_names, fields, ids, labs)
        counts = store.counts()
        if counts["missing"] == 0:
            log.info(
                "%s: complete (%d done, %d failed); nothing to write", path, counts["done"], counts["failed"]
            )
        else:
            log.info(
                "%s: resuming (%d done, %d failed, %d missing)",
                path,
                counts["done"],
                counts["failed"],
                counts["missing"],
            )
        return store

    @staticmethod
    def build_remote(
        url: StoreURL,
        layout: StoreLayout,
        attrs: dict[str, Any],
        ids: np.ndarray,
        labs: np.ndarray,
        overwrite: bool,
        fill: Callable[[zarr.Group], None] | None = None,
    ) -> bool:
        """Builds the store in place under a creation lease (object stores have no rename): the group's
        attributes are written last, so the prefix is a store only once everything else is there (with
        ``fill``, the data it writes too: ``store import``). A creation killed half-way leaves the marker
        ``_locks/creating``: its leftovers may be replaced. False when the store exists (made by another
        process meanwhile, or already there without ``overwrite``): nothing was written."""
        objects = ObjectIO(url)
        if overwrite and is_store(url):
            objects.delete_all()
        if is_store(url):
            return False
        deadline = time.monotonic() + 1.5 * LEASE_SECONDS
        while True:  # another process creating the same store: wait for it (or for its lease to lapse)
            try:
                lease = ObjectLease(objects, CREATE_LEASE, "the store's creation").acquire()
                break
            except ShardBusyError:
                if is_store(url):
                    return False
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{url}: another process has been creating this store too long"
                    ) from None
                time.sleep(0.1)
        try:
            if is_store(url):
                return False
            leftovers = [m["path"] for m in objects.list() if not m["path"].startswith(LOCK_DIR + "/")]
            if leftovers and objects.head(CREATE_LEASE_MARK) is None:
                raise StoreError(f"{url}: holds objects but no amflow feature store; refusing to write there")
            objects.put(CREATE_LEASE_MARK, b"")  # leftovers of this creation may be replaced
            objects.delete_all(keep=LOCK_DIR + "/")
            build_empty_store(objects, layout, attrs, ids, labs, fill)
            objects.delete(CREATE_LEASE_MARK)
            return True
        finally:
            lease.release()

    @staticmethod
    def _build_and_move(
        path: Path, layout: StoreLayout, attrs: Mapping[str, Any], ids: np.ndarray, labs: np.ndarray
    ) -> bool:
        """Builds in a temp folder beside ``path``, then renames it into place (atomic; False if beaten).

        A filesystem error (full disk, read-only target) is a one-line StoreError; nothing is left behind.
        """
        try:
            return FeatureStore._build_and_rename(path, layout, attrs, ids, labs)
        except OSError as e:
            raise StoreError(f"{path}: cannot create the store ({e.strerror or e}); nothing was left") from e

    @staticmethod
    def _build_and_rename(
        path: Path, layout: StoreLayout, attrs: Mapping[str, Any], ids: np.ndarray, labs: np.ndarray
    ) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in _stale_creation_dirs(path):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = (
            path.parent / f".{path.name}.creating-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        try:
            build_empty_store(tmp, layout, attrs, ids, labs)
            try:
                os.rename(tmp, path)
            except OSError:
                if is_store(path):
                    return False
                raise
            fsync_path(path)
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _check_same(
        self,
        layout: StoreLayout,
        shard_clips_arg: int | None,
        chunk_clips_arg: int | None,
        a_names: list[str],
        f_names: list[str],
        fields: Mapping[str, Any],
        ids: np.ndarray,
        labs: np.ndarray,
    ) -> None:
        if compute_fingerprint(fields) != self.fingerprint:
            diffs = fingerprint_differences(self.fingerprint_fields, fields)
            raise FingerprintMismatch(
                f"{self.path}: holds a store made with other settings ({len(diffs)} field(s) differ):\n  "
                + "\n  ".join(diffs)
                + "\n(delete that store to start again, or write to another path)"
            )
        have, want = self.layout.to_dict(), layout.to_dict()
        if shard_clips_arg is None:
            want["shard_clips"] = have["shard_clips"]
        if chunk_clips_arg is None:
            want["chunk_clips"] = have["chunk_clips"]
        bad = [f"{k}: stored {have[k]!r}, asked {want[k]!r}" for k in have if have[k] != want[k]]
        if list(self.adapter_names) != a_names:
            bad.append(f"adapter_names: stored {self.adapter_names}, asked {a_names}")
        if list(self.flow_block_names) != f_names:
            bad.append(f"flow_block_names: stored {self.flow_block_names}, asked {f_names}")
        if bad:
            old = self._meta["schema_version"] != SCHEMA_VERSION
            raise StoreError(
                f"{self.path}: existing store has another layout:\n  "
                + "\n  ".join(bad)
                + (
                    f"\n(a schema {self._meta['schema_version']} store: extract into a new path)"
                    if old
                    else ""
                )
            )
        if len(ids) != self.num_clips or (self.clip_ids != ids).any():
            n = min(len(ids), self.num_clips)
            first = (
                int(np.flatnonzero(self.clip_ids[:n] != ids[:n])[0])
                if (self.clip_ids[:n] != ids[:n]).any()
                else n
            )
            raise StoreError(
                f"{self.path}: existing store holds other clips ({self.num_clips} stored, {len(ids)} asked; "
                f"first difference at index {first})"
            )
        try:
            damage = "values below -1" if (self.labels < -1).any() else None
        except StoreError as e:
            damage = f"unreadable ({e.__cause__!r})"
        if damage is not None:  # labels come from the dataset: the resuming command mends them
            log.warning("%s: labels %s; rewriting them from the dataset", self.path, damage)
            self.rewrite_labels(labs)
        if (self.labels != labs).any():
            first = int(np.flatnonzero(self.labels != labs)[0])
            raise StoreError(
                f"{self.path}: existing store has other labels (first at index {first}, clip "
                f"{self.clip_ids[first]!r}: stored {int(self.labels[first])}, asked {int(labs[first])})"
            )

    # ------------------------------------------------------------------ metadata
    @property
    def attrs(self) -> dict[str, Any]:
        """All store attributes (schema version, layout, names, fingerprint, provenance)."""
        return json.loads(json.dumps(self._meta))

    @property
    def provenance(self) -> dict[str, Any]:
        """What made the store: the caller's record plus amflow_version, created and schema_version."""
        return json.loads(json.dumps(self._meta["provenance"]))

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of :attr:`fingerprint_fields`."""
        return str(self._meta["fingerprint"])

    @property
    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that change the features, as given at creation."""
        return json.loads(json.dumps(self._meta["fingerprint_fields"]))

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters along the ``embeddings`` adapter axis."""
        return list(self._meta["adapter_names"])

    @property
    def flow_block_names(self) -> list[str]:
        """Names of the blocks along the ``flow`` block axis (empty without flow)."""
        return list(self._meta["flow_block_names"])

    @property
    def has_flow(self) -> bool:
        """Whether AM-flow maps are stored."""
        return self.layout.flow_blocks is not None

    @property
    def flow_geometry(self) -> list[FlowBlock]:
        """Per flow block the geometry of its stored maps (empty without flow)."""
        return list(self.layout.flow_blocks or ())

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names (label i names class i), or None when the store records none.

        Stores of schema 1 recorded them in the provenance (``classes``); read from there."""
        names = self._meta.get("class_names", self._meta["provenance"].get("classes"))
        return [str(c) for c in names] if names else None

    @property
    def num_classes(self) -> int | None:
        """Number of classes of the dataset (from the class names; schema 1: the provenance's count)."""
        names = self.class_names
        return len(names) if names else self._meta["provenance"].get("num_classes")

    @property
    def num_clips(self) -> int:
        """Number of clips (done or not)."""
        return self.layout.num_clips

    @property
    def shard_clips(self) -> int:
        """Clips per shard (the unit a writer owns)."""
        return self.layout.shard_clips

    @property
    def num_shards(self) -> int:
        """Number of shards along the clip axis."""
        return self.layout.num_shards

    @property
    def data_arrays(self) -> list[str]:
        """Names of the per-clip float arrays present (``embeddings``, ``flow`` if stored, ``cls``)."""
        return list(self.layout.clip_shapes())

    @property
    def array_names(self) -> list[str]:
        """Every array in the store."""
        return [*self.data_arrays, "labels", "clip_ids", "status", "failure_type", "failure_message"]

    def array(self, name: str) -> zarr.Array:
        """The Zarr array ``name`` (opened once)."""
        if name not in self._arrays:
            if name not in self.array_names:
                raise KeyError(f"{self.path}: no array {name!r}; arrays: {self.array_names}")
            try:
                arr = self._group[name]
            except Exception as e:  # a missing or unparsable zarr.json (KeyError, JSONDecodeError, ...)
                raise StoreError(
                    f"{self.path / name / 'zarr.json'}: unreadable ({type(e).__name__}: {e}); "
                    f"`amflow store repair {self.path}` rebuilds it from the store's layout"
                ) from e
            # Zarr's default skips chunks equal to the fill value, testing NaN equality over the whole
            # chunk at ~100 MB/s; writing them anyway makes commits several times faster.
            self._arrays[name] = arr if self.read_only else arr.with_config({"write_empty_chunks": True})
        return self._arrays[name]

    @property
    def clip_ids(self) -> np.ndarray:
        """Clip ids (relative video paths) as a numpy StringDType array."""
        if self._clip_ids is None:
            self._clip_ids = np.asarray(self._read_table("clip_ids"), dtype=STRING_DTYPE)
        return self._clip_ids

    @property
    def labels(self) -> np.ndarray:
        """Class index per clip (int64; -1 = unlabelled)."""
        if self._labels is None:
            self._labels = np.asarray(self._read_table("labels"), dtype=np.int64)
        return self._labels

    def _read_table(self, name: str) -> np.ndarray:
        """All of ``labels`` or ``clip_ids``; a damaged chunk is one StoreError naming the array's folder
        (a Zstd error or a truncated file is not a traceback) and what mends it."""
        arr = self.array(name)
        try:
            return arr[:]
        except Exception as e:
            mend = (
                "the same `amflow extract` command rewrites the labels from the dataset's annotations"
                if name == "labels"
                else "the clip table cannot be rebuilt: extract into a new store (another --out)"
            )
            raise StoreError(f"{self.path / name}: unreadable chunk ({type(e).__name__}: {e}); {mend}") from e

    def rewrite_labels(self, labels: np.ndarray) -> None:
        """Rebuilds the ``labels`` array (metadata and chunks) from ``labels``: how a resumed extraction mends
        a store whose labels are damaged (they come from the dataset's annotations, not from extraction)."""
        self.require_writable()
        self._arrays.pop("labels", None)
        shutil.rmtree(self.path / "labels", ignore_errors=True)
        arr = self._group.create_array("labels", **array_definitions(self.layout)["labels"], overwrite=True)
        arr[:] = labels
        fsync_tree(self.path / "labels")
        self._labels = None

    def index_of(self, clip_id: str | Sequence[str]) -> int | np.ndarray:
        """Clip index of an id (or an int64 array of indices for a list of ids); KeyError if unknown.

        Binary search over the UTF-8 bytes of the ids (numpy's searchsorted on StringDType is unreliable).
        """
        if self._id_order is None:
            keys = np.strings.encode(self.clip_ids, "utf-8")
            self._id_order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._id_order]
        query = np.strings.encode(np.atleast_1d(np.asarray(clip_id, dtype=STRING_DTYPE)), "utf-8")
        pos = np.clip(np.searchsorted(self._sorted_keys, query), 0, len(self._sorted_keys) - 1)
        found = self._sorted_keys[pos] == query
        if not found.all():
            raise KeyError(f"{self.path}: no clip with id {query[~found][0].decode()!r}")
        out = self._id_order[pos].astype(np.int64)
        return int(out[0]) if isinstance(clip_id, str) else out

    # ------------------------------------------------------------------ status
    def status(self) -> np.ndarray:
        """Per-clip status read from disk: 0 missing, 1 done, 2 failed (int8). A raw status chunk per
        shard (the layout since the first version) is read straight from its file, as data shards are."""
        arr = self.array("status")
        try:
            if not is_raw(arr) or tuple(arr.chunks) != (self.shard_clips,):
                return np.asarray(arr[:], dtype=np.int8)
            out = np.empty(self.num_clips, dtype=np.int8)
            for shard in range(self.num_shards):
                clips = self.clips_in_shard(shard)
                read_shard(self, "status", shard, out=out[clips.start : clips.stop])
            return out
        except Exception as e:
            raise StoreError(
                f"{self.path / 'status'}: unreadable chunk ({type(e).__name__}: {e}); "
                f"`amflow store repair {self.path}` hands its clips back to extraction"
            ) from e

    def done_mask(self) -> np.ndarray:
        """Boolean mask of clips whose data is complete on disk."""
        return self.status() == STATUS_DONE

    def failed_mask(self) -> np.ndarray:
        """Boolean mask of clips recorded as failed."""
        return self.status() == STATUS_FAILED

    def missing(self) -> np.ndarray:
        """Indices of clips neither done nor failed (what a resumed extraction still has to do)."""
        return np.flatnonzero(self.status() == STATUS_MISSING)

    def counts(self) -> dict[str, int]:
        """``{"done", "failed", "missing"}`` clip counts from one read of the status array."""
        s = self.status()
        return {
            "done": int((s == STATUS_DONE).sum()),
            "failed": int((s == STATUS_FAILED).sum()),
            "missing": int((s == STATUS_MISSING).sum()),
        }

    def failures(self) -> list[dict[str, Any]]:
        """Failed clips as records ``{index, clip_id, error_type, message}`` in clip order."""
        idx = np.flatnonzero(self.status() == STATUS_FAILED)
        if len(idx) == 0:
            return []
        types = self.array("failure_type").get_coordinate_selection(idx)
        messages = self.array("failure_message").get_coordinate_selection(idx)
        return [
            {"index": int(i), "clip_id": str(self.clip_ids[i]), "error_type": str(t), "message": str(m)}
            for i, t, m in zip(idx, types, messages, strict=True)
        ]

    def clips_in_shard(self, shard: int) -> range:
        """Clip indices of shard ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"{self.path}: shard {shard} out of range [0, {self.num_shards})")
        start = shard * self.shard_clips
        return range(start, min(start + self.shard_clips, self.num_clips))

    def shard_of(self, index: int) -> int:
        """Shard holding clip ``index``."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"{self.path}: clip index {index} out of range [0, {self.num_clips})")
        return index // self.shard_clips

    def pending_shards(self) -> list[int]:
        """Shards with at least one missing clip (the work left, in writer-sized units)."""
        s = self.status()
        pad = (-len(s)) % self.shard_clips
        per_shard = np.concatenate([s, np.full(pad, STATUS_DONE, np.int8)]).reshape(-1, self.shard_clips)
        return [int(i) for i in np.flatnonzero((per_shard == STATUS_MISSING).any(axis=1))]

    def is_complete(self) -> bool:
        """True when no clip is missing (every clip done or failed)."""
        return not (self.status() == STATUS_MISSING).any()

    # ------------------------------------------------------------------ reading / writing
    def read_clip(self, clip: int | str) -> dict[str, np.ndarray]:
        """One clip's float arrays in the stored dtype, by index or id (NaN where not done)."""
        i = self.index_of(clip) if isinstance(clip, str) else int(clip)
        self.shard_of(i)
        return {name: np.asarray(self.array(name)[i]) for name in self.data_arrays}

    def to_dask(self, name: str) -> dask.array.Array:
        """A lazy dask view of one array, chunked by shard (one task per shard file)."""
        import dask.array as da

        arr = self.array(name)
        return da.from_zarr(arr, chunks=arr.shards or arr.chunks)

    def shard_writer(
        self, shard: int, *, commit_every: int | None = None, durable: bool = True
    ) -> ShardWriter:
        """A writer owning ``shard`` (see :class:`store.writer.ShardWriter`); use it as a context manager."""
        return ShardWriter(self, shard, commit_every=commit_every, durable=durable)

    def require_writable(self) -> None:
        """Raises :class:`ReadOnlyStoreError` for a store opened with ``mode="r"``."""
        if self.read_only:
            raise ReadOnlyStoreError(f"{self.path}: opened read-only; open it with mode='r+' to write")

    def chunk_key(self, name: str, shard: int) -> str:
        """Key of the file or object holding shard ``shard`` of array ``name``, relative to the store."""
        arr = self.array(name)
        return f"{name}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"

    def chunk_file(self, name: str, shard: int) -> Path:
        """Path of the file holding shard ``shard`` of array ``name`` (it may not exist yet)."""
        if self.objects is not None:
            raise StoreError(f"{self.path}: lives on object storage; it has objects (chunk_key), not files")
        return self.path / self.chunk_key(name, shard)

    def chunk_nbytes(self, name: str, shard: int) -> int | None:
        """Bytes of the file or object of shard ``shard`` of array ``name``; None when it is absent."""
        if self.objects is not None:
            meta = self.objects.head(self.chunk_key(name, shard))
            return None if meta is None else int(meta["size"])
        try:
            return self.chunk_file(name, shard).stat().st_size
        except FileNotFoundError:
            return None

    def delete_chunk(self, name: str, shard: int) -> None:
        """Removes the file or object of shard ``shard`` of array ``name`` (it then reads as fill)."""
        if self.objects is not None:
            self.objects.delete(self.chunk_key(name, shard))
        else:
            self.chunk_file(name, shard).unlink(missing_ok=True)

    def __repr__(self) -> str:
        c = self.counts()
        return (
            f"FeatureStore({str(self.path)!r}, clips={self.num_clips}, done={c['done']}, "
            f"failed={c['failed']}, missing={c['missing']}, shards={self.num_shards}x{self.shard_clips}, "
            f"mode={'r' if self.read_only else 'r+'})"
        )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

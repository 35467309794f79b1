"""HDF5 export and import of a feature store (same arrays, same attributes, failures included)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import zarr
from tqdm.auto import tqdm

from foundation.atomic import atomic_path
from store.feature_store import (
    ATTRS_KEY,
    READABLE_SCHEMA_VERSIONS,
    STRING_DTYPE,
    FeatureStore,
    NotAStoreError,
    StoreError,
    StoreLayout,
    build_empty_store,
    check_free_space,
    is_store,
)
from store.objects import StoreURL, is_url
from store.repair import damage_summary, find_damage

H5_COMPRESSIONS = ("none", "gzip", "lzf")
PER_SHARD_ARRAYS = ("failure_type", "failure_message", "status")  # in a writer's commit order


def _h5_compression(compression: str) -> dict[str, object]:
    if compression not in H5_COMPRESSIONS:
        raise StoreError(f"compression={compression!r}: expected one of {H5_COMPRESSIONS}")
    return {} if compression == "none" else {"compression": compression}


def export_h5(
    store: FeatureStore | str | Path,
    out_path: str | Path,
    *,
    compression: str = "none",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes every array and the store attributes (JSON in the ``amflow_store`` attribute) to one HDF5 file.

    The file is written under a temporary name and renamed at the end, so an interrupted export leaves
    no file that looks complete.
    """
    if is_url(out_path):
        raise StoreError(f"{out_path}: export writes a local HDF5 file; give a local path")
    st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    damage = find_damage(st)  # an export would copy the damage (or fail half-way through it)
    if damage:
        raise StoreError(f"{st.path}: {damage_summary(st, damage)}")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise StoreError(f"{out}: exists (pass overwrite=True / --overwrite to replace it)")
    if out.is_dir():
        raise StoreError(f"{out}: is a folder; expected the path of an HDF5 file")
    comp = _h5_compression(compression)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{out}: cannot create its folder: {e.strerror or e}") from e
    arrays = {name: st.array(name) for name in st.array_names}
    # Uncompressed size (text arrays: their length in bytes at most); compressed output may be smaller.
    needed = sum(a.nbytes for n, a in arrays.items() if n in st.data_arrays) + 64 * st.num_clips
    per_shard = max(1, needed // st.num_shards)
    if not comp:
        check_free_space(out, needed)
    try:
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
            f.attrs[ATTRS_KEY] = json.dumps(st.attrs)
            f.attrs["schema_version"] = st.attrs["schema_version"]
            f.attrs["fingerprint"] = st.fingerprint
            for name, arr in arrays.items():
                is_text = name in ("clip_ids", "failure_type", "failure_message")
                dtype = h5py.string_dtype() if is_text else arr.dtype
                chunks = (1, *arr.shape[1:]) if name in st.data_arrays else True
                f.create_dataset(name, shape=arr.shape, dtype=dtype, chunks=chunks, **comp)
            for shard in tqdm(
                range(st.num_shards),
                desc=f"exporting {st.path.name}",
                unit="shard",
                disable=not progress or st.num_shards < 8,
            ):
                # h5py can crash the process when the disk fills mid-write: stop before that happens.
                check_free_space(out, per_shard)
                sl = slice(st.clips_in_shard(shard).start, st.clips_in_shard(shard).stop)
                for name, arr in arrays.items():
                    f[name][sl] = arr[sl]
    except OSError as e:  # h5py's write errors are OSErrors too
        raise StoreError(f"{out}: export failed ({e.strerror or e}); the partial file was removed") from e
    return out


def _read_attrs(f: h5py.File, path: Path) -> dict:
    if ATTRS_KEY not in f.attrs:
        raise NotAStoreError(f"{path}: not an amflow store export (no {ATTRS_KEY!r} attribute)")
    attrs = json.loads(f.attrs[ATTRS_KEY])
    if attrs.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise StoreError(
            f"{path}: schema version {attrs.get('schema_version')!r}, expected one of "
            f"{READABLE_SCHEMA_VERSIONS}"
        )
    return attrs


def import_h5(
    h5_path: str | Path, out_path: str | Path, *, overwrite: bool = False, progress: bool = True
) -> FeatureStore:
    """Rebuilds a store from :func:`export_h5` output, with the same attributes (fingerprint, provenance).

    A folder store is built in a temporary folder and renamed into place when complete. On object
    storage (``s3://``) it is built in place under the creation lease, with its attributes written after
    all of its data: the prefix becomes a store only once the import is complete (an interrupted import
    leaves no store, and its leftovers are replaced by the next one; ``overwrite`` deletes the old store
    first, as object stores cannot swap a prefix).
    """
    src = Path(h5_path)
    if not src.is_file():
        raise StoreError(f"{src}: no such HDF5 file")
    out: Path | StoreURL = StoreURL.parse(out_path) if is_url(out_path) else Path(out_path)
    exists = is_store(out) if isinstance(out, StoreURL) else out.exists()
    if exists and not overwrite:
        raise StoreError(f"{out}: exists (pass overwrite=True / --overwrite to replace it)")
    if exists and isinstance(out, Path) and not is_store(out):
        raise StoreError(f"{out}: exists and is not an amflow feature store; refusing to delete it")
    if not h5py.is_hdf5(src):  # by its content, whatever its name
        raise StoreError(f"{src}: not an HDF5 file (expected one written by amflow store export)")
    with h5py.File(src, "r") as f:
        attrs = _read_attrs(f, src)
        layout = StoreLayout.from_dict(attrs["layout"], attrs.get("provenance"))
        ids = np.asarray(f["clip_ids"].asstr()[:], dtype=STRING_DTYPE)
        labels = np.asarray(f["labels"][:], dtype=np.int64)

        def fill(group: zarr.Group) -> None:
            arrays = {
                name: group[name].with_config({"write_empty_chunks": True})
                for name in (*layout.clip_shapes(), *PER_SHARD_ARRAYS)
            }
            for shard in tqdm(
                range(layout.num_shards),
                desc=f"importing {src.name}",
                unit="shard",
                disable=not progress or layout.num_shards < 8,
            ):
                start = shard * layout.shard_clips
                sl = slice(start, min(start + layout.shard_clips, layout.num_clips))
                # Data first, status last: the same order a writer commits in.
                for name, arr in arrays.items():
                    ds = f[name]
                    if h5py.check_string_dtype(ds.dtype):
                        arr[sl] = np.asarray(ds.asstr()[sl], dtype=STRING_DTYPE)
                    else:
                        arr[sl] = ds[sl]

        if isinstance(out, StoreURL):
            if not FeatureStore.build_remote(out, layout, attrs, ids, labels, overwrite, fill):
                raise StoreError(f"{out}: another process created a store there during the import")
            return FeatureStore.open(out, mode="r")
        tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_empty_store(tmp, layout, attrs, ids, labels, fill)  # fsyncs the whole tree
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return FeatureStore.open(out, mode="r")

"""Finding a store's damage and mending it (``amflow store repair``).

Two kinds of checks, shared by every command that reads a store:
- :func:`find_damage`, cheap (metadata, the clip table, status values, the size of each done shard's
  files): ``store verify``, ``extract`` (before it calls a store complete) and stage 2 all run it;
- :func:`scan_clips`, every value of every done clip (NaN/inf, undecodable chunks): ``store verify`` and
  stage 2.
Repair rebuilds damaged array metadata from the store's layout and hands damaged clips back to
extraction (status missing), so the same ``amflow extract`` command redoes exactly those clips; labels
are rewritten by that command (they come from the dataset); a damaged clip-id table cannot be mended.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.storage import LocalStore

from foundation.atomic import write_bytes_atomic
from store.fastio import is_raw, read_shard
from store.feature_store import STATUS_DONE, STATUS_FAILED, STATUS_MISSING, FeatureStore, nonfinite_mask
from store.layout import array_definitions
from store.schema import StoreError

MAX_REPORTED_CLIPS = 20


@dataclasses.dataclass
class ClipScan:
    """What a scan of the done clips found, per array: clip indices and shards that could not be read."""

    nonfinite: dict[str, list[int]]  # done clips with NaN/inf (a deleted shard file reads as NaN)
    unreadable: dict[str, list[tuple[int, str]]]  # (shard, error) of shard files that could not be decoded
    all_zero: dict[str, list[int]]  # done clips whose values are all 0 (suspicious, not an error)
    damaged: list[int]  # done clips that cannot be trusted: non-finite or in an unreadable shard

    @property
    def ok(self) -> bool:
        return not self.damaged


def clips_text(store: FeatureStore, indices: Sequence[int] | np.ndarray) -> str:
    """``3 (a.mp4), 7 (b.mp4) and 12 more``: clip indices with their ids, at most 20 listed."""
    indices = np.asarray(indices)
    shown = ", ".join(f"{int(i)} ({store.clip_ids[i]!s})" for i in indices[:MAX_REPORTED_CLIPS])
    more = len(indices) - MAX_REPORTED_CLIPS
    return shown + (f" and {more} more" if more > 0 else "")


def scan_clips(
    store: FeatureStore | str | Path, arrays: Sequence[str] | None = None, *, progress: bool = False
) -> ClipScan:
    """Reads every shard holding done clips, for each of ``arrays`` (default: all float arrays)."""
    st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    names = [n for n in (arrays or st.data_arrays) if n in st.data_arrays and _opens(st, n)]
    done = read_status(st)[0] == STATUS_DONE
    shards = [
        s for s in range(st.num_shards) if done[st.clips_in_shard(s).start : st.clips_in_shard(s).stop].any()
    ]
    nonfinite: dict[str, list[int]] = {n: [] for n in names}
    zero: dict[str, list[int]] = {n: [] for n in names}
    unreadable: dict[str, list[tuple[int, str]]] = {n: [] for n in names}
    damaged: set[int] = set()
    bar = tqdm(
        shards, desc=f"verifying {st.path.name}", unit="shard", disable=not progress or len(shards) < 8
    )
    for shard in bar:
        clips = st.clips_in_shard(shard)
        local = np.flatnonzero(done[clips.start : clips.stop])
        for name in names:
            try:
                block = read_shard(st, name, shard)[local]  # raw shard files straight from disk
            except Exception as e:  # a damaged shard file: report it, keep checking the others
                unreadable[name].append((shard, repr(e)))
                damaged.update(int(clips.start + i) for i in local)
                continue
            flat = block.reshape(len(local), -1)
            broken = local[nonfinite_mask(flat).any(axis=1)]
            nonfinite[name].extend(int(clips.start + i) for i in broken)
            damaged.update(int(clips.start + i) for i in broken)
            zero[name].extend(int(clips.start + i) for i in local[~flat.any(axis=1)])
    return ClipScan(nonfinite, unreadable, zero, sorted(damaged))


def scan_problems(st: FeatureStore, scan: ClipScan) -> list[str]:
    """One line per array with unreadable shards or non-finite done clips."""
    lines = []
    for name, shards in scan.unreadable.items():
        for shard, error in shards:
            clips = st.clips_in_shard(shard)
            lines.append(f"{name}: shard {shard} (clips {clips.start}..{clips.stop - 1}) unreadable: {error}")
    for name, bad in scan.nonfinite.items():
        if bad:
            lines.append(
                f"{name}: {len(bad)} done clip(s) with missing or non-finite values: {clips_text(st, bad)}"
            )
    return lines


def scan_warnings(st: FeatureStore, scan: ClipScan) -> list[str]:
    """One line per array with done clips that are all zeros (legal, but rarely real features)."""
    return [
        f"{name}: {len(bad)} done clip(s) are all zeros: {clips_text(st, bad)}"
        for name, bad in scan.all_zero.items()
        if bad
    ]


Mend = Literal["repair", "extract", "new store"]


@dataclasses.dataclass(frozen=True)
class Damage:
    """One structural fault: a line naming the file and what is wrong, who mends it, and where."""

    line: str
    mend: Mend  # "repair": store repair; "extract": the same extract command; "new store": nothing can
    array: str
    shard: int | None = None  # the shard whose file is damaged; None: the array's metadata or table
    clips: tuple[int, ...] = ()  # clips to hand back to extraction
    metadata: bool = False  # the array's zarr.json (rebuilt from the layout by repair)


def _opens(st: FeatureStore, name: str) -> bool:
    """Whether array ``name``'s metadata reads and matches the layout (:func:`find_damage` names why not)."""
    return _metadata_fault(st, name) is None


def _metadata_fault(st: FeatureStore, name: str) -> str | None:
    """Why ``name/zarr.json`` is unusable (unreadable, or another shape, dtype or chunking than the
    store's layout defines), or None."""
    try:
        arr = st.array(name)
    except StoreError as e:
        return f"unreadable ({type(e.__cause__).__name__}: {e.__cause__})"
    want = array_definitions(st.layout)[name]
    got = {"shape": arr.shape, "chunks": arr.chunks, "shards": arr.shards}
    expected = {"shape": tuple(want["shape"]), "chunks": tuple(want["chunks"]), "shards": want.get("shards")}
    expected["shards"] = tuple(expected["shards"]) if expected["shards"] is not None else None
    bad = [f"{k} {got[k]} (layout: {expected[k]})" for k in got if got[k] != expected[k]]
    if want["dtype"] is not str and np.dtype(want["dtype"]) != arr.dtype:
        bad.append(f"dtype {arr.dtype} (layout: {want['dtype']})")
    return f"does not match the store's layout: {', '.join(bad)}" if bad else None


UNREADABLE = 256  # read_status's value for clips whose status file cannot be read (no int8 value)


def read_status(st: FeatureStore) -> tuple[np.ndarray, dict[int, str]]:
    """The status array (int16) with :data:`UNREADABLE` for clips of shards whose status file cannot be
    read, and those shards' errors."""
    out = np.full(st.num_clips, UNREADABLE, dtype=np.int16)
    if not _opens(st, "status"):
        return out, {s: "status metadata damaged" for s in range(st.num_shards)}
    errors: dict[int, str] = {}
    arr = st.array("status")
    for shard in range(st.num_shards):
        clips = st.clips_in_shard(shard)
        try:
            size = st.chunk_nbytes("status", shard) if is_raw(arr) else None
            if size is not None and size != st.shard_clips:
                raise OSError(f"{size} bytes, expected {st.shard_clips}")
            out[clips.start : clips.stop] = read_shard(st, "status", shard)
        except Exception as e:
            errors[shard] = f"{type(e).__name__}: {e}"
    return out, errors


def find_damage(st: FeatureStore) -> list[Damage]:
    """The structural faults of a store, cheaply: array metadata, the clip table, status values, failure
    texts, and that every shard with done clips has its data files at their full size. What it cannot see
    (values inside a chunk) is :func:`scan_clips`'s job."""
    found: list[Damage] = []
    broken = set()
    for name in st.array_names:
        fault = _metadata_fault(st, name)
        if fault is not None:
            broken.add(name)
            found.append(Damage(f"{name}/zarr.json: {fault}", "repair", name, metadata=True))
    if "clip_ids" not in broken:
        try:
            ids = st.clip_ids
        except StoreError as e:
            found.append(Damage(f"clip_ids: unreadable chunk ({e.__cause__!r})", "new store", "clip_ids"))
        else:
            if len(np.unique(ids)) != len(ids):
                found.append(Damage(f"{st.path / 'clip_ids'}: ids are not unique", "new store", "clip_ids"))
            empty = np.flatnonzero(np.strings.str_len(ids) == 0)
            if len(empty):
                found.append(
                    Damage(
                        f"{st.path / 'clip_ids'}: empty id(s) at clip(s) {list(empty[:20])}",
                        "new store",
                        "clip_ids",
                    )
                )
    ids_ok = not any(d.array == "clip_ids" for d in found)
    if "labels" not in broken:
        try:
            low = np.flatnonzero(st.labels < -1)
        except StoreError as e:
            found.append(Damage(f"labels: unreadable chunk ({e.__cause__!r})", "extract", "labels"))
        else:
            if len(low):
                where = clips_text(st, low) if ids_ok else str(list(low[:20]))
                found.append(Damage(f"labels: values below -1 at clip(s) {where}", "extract", "labels"))
    if "status" in broken:
        return found
    status, errors = read_status(st)
    for shard, error in errors.items():
        path = st.chunk_key("status", shard)
        found.append(Damage(f"status: {path} unreadable ({error})", "repair", "status", shard))
    invalid = np.flatnonzero(~np.isin(status, [STATUS_MISSING, STATUS_DONE, STATUS_FAILED, UNREADABLE]))
    if len(invalid):
        where = clips_text(st, invalid) if ids_ok else str(list(invalid[:20]))
        found.append(
            Damage(
                f"status: invalid value(s) {sorted(set(status[invalid].tolist()))} at clip(s) {where}",
                "repair",
                "status",
                clips=tuple(int(i) for i in invalid),
            )
        )
    found += _failure_damage(st, status, broken)
    for name in st.data_arrays:
        if name not in broken:
            found += _data_file_damage(st, name, status)
    return found


def _failure_damage(st: FeatureStore, status: np.ndarray, broken: set[str]) -> list[Damage]:
    """Failed clips whose failure texts cannot be read or are empty: handed back to extraction."""
    found = []
    failed = np.flatnonzero(status == STATUS_FAILED)
    for shard in sorted({st.shard_of(int(i)) for i in failed}):
        clips = st.clips_in_shard(shard)
        mine = tuple(int(i) for i in failed if clips.start <= i < clips.stop)
        for name in ("failure_type", "failure_message"):
            if name in broken:
                continue
            try:
                texts = np.asarray(st.array(name)[clips.start : clips.stop])
            except Exception as e:
                path = st.chunk_key(name, shard)
                found.append(
                    Damage(
                        f"{name}: {path} unreadable ({type(e).__name__}: {e})", "repair", name, shard, mine
                    )
                )
                continue
            untyped = tuple(i for i in mine if name == "failure_type" and not texts[i - clips.start])
            if untyped:
                found.append(
                    Damage(
                        f"failures: failed clip(s) without an error type: {clips_text(st, untyped)}",
                        "repair",
                        name,
                        clips=untyped,
                    )
                )
    return found


def _data_file_damage(st: FeatureStore, name: str, status: np.ndarray) -> list[Damage]:
    """Shards with done clips whose file of array ``name`` is missing or, for plain-bytes files, not the
    size of a whole chunk (a truncated or overwritten file)."""
    found = []
    arr = st.array(name)
    full = st.shard_clips * math.prod(arr.shape[1:]) * arr.dtype.itemsize if is_raw(arr) else None
    for shard in range(st.num_shards):
        clips = st.clips_in_shard(shard)
        done = tuple(
            int(clips.start + i) for i in np.flatnonzero(status[clips.start : clips.stop] == STATUS_DONE)
        )
        if not done:
            continue
        path = st.chunk_key(name, shard)
        size = st.chunk_nbytes(name, shard)
        if size is None:
            found.append(
                Damage(
                    f"{name}: {path} missing ({len(done)} done clip(s))",
                    "repair",
                    name,
                    shard,
                    done,
                )
            )
            continue
        if full is not None and size != full:
            line = f"{name}: {path} has {size} bytes, a whole chunk {full} ({len(done)} done clip(s))"
            found.append(Damage(line, "repair", name, shard, done))
    return found


def damage_summary(st: FeatureStore, damage: Sequence[Damage]) -> str:
    """One line: the first fault, how many more, and what to do (the mend of the hardest one)."""
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    first = damage[0].line
    if any(d.mend == "new store" for d in damage):
        first = next(d.line for d in damage if d.mend == "new store")
        todo = "it cannot be repaired: extract into a new store (another --out) and delete this one"
    elif all(d.mend == "extract" for d in damage):
        todo = "run the same `amflow extract` command (it rewrites the labels from the dataset)"
    else:
        todo = f"run `amflow store repair {st.path}`, then the same `amflow extract` command"
    return f"damaged store: {first}{more}; {todo}"


@dataclasses.dataclass
class RepairReport:
    """What :func:`repair_store` did, and what it left to ``extract`` or could not mend."""

    redo: list[int]  # clips handed back to extraction (status missing)
    rebuilt: list[str]  # files rebuilt from the store's layout
    deleted: list[str]  # unreadable files deleted (their clips are in ``redo``)
    left: list[Damage]  # faults repair does not mend: for the extract command, or for a new store


def repair_store(store: FeatureStore | str | Path, *, progress: bool = False) -> RepairReport:
    """Mends what :func:`find_damage` and :func:`scan_clips` find: rebuilds damaged array metadata from the
    layout, deletes unreadable files, and marks every clip that cannot be trusted missing (its data NaN)
    so the same ``amflow extract`` command redoes it. Writes through the shard writer: the same locks and
    commit order as extraction."""
    path = store.path if isinstance(store, FeatureStore) else store
    st = FeatureStore.open(path, mode="r+")
    st.require_writable()
    report = RepairReport([], [], [], [])
    damage = find_damage(st)
    metadata = [d for d in damage if d.metadata]
    if metadata:
        report.rebuilt = _rebuild_metadata(st, [d.array for d in metadata])
        st = FeatureStore.open(path, mode="r+")
        damage = find_damage(st)
    report.left = [d for d in damage if d.mend != "repair"]
    if any(d.array == "clip_ids" for d in report.left):
        return report  # without clip ids no clip can be named, nor its data trusted to be its own
    redo: set[int] = set()
    for d in damage:
        if d.mend != "repair":
            continue
        if d.shard is not None:  # an unreadable or truncated file: delete it, redo its shard's clips
            if st.chunk_nbytes(d.array, d.shard) is not None:
                st.delete_chunk(d.array, d.shard)
                report.deleted.append(st.chunk_key(d.array, d.shard))
            if d.array == "status":  # its clips read as missing now: nothing else to hand back
                continue
        redo.update(d.clips)
    if report.deleted:
        st = FeatureStore.open(path, mode="r+")
    scan = scan_clips(st, progress=progress)
    for name, shards in scan.unreadable.items():
        for shard, _ in shards:
            st.delete_chunk(name, shard)
            report.deleted.append(st.chunk_key(name, shard))
    redo.update(scan.damaged)
    by_shard: dict[int, list[int]] = {}
    for i in sorted(redo):
        by_shard.setdefault(st.shard_of(i), []).append(i)
    for shard, clips in by_shard.items():
        with st.shard_writer(shard) as writer:
            for i in clips:
                writer.reset(i)
    report.redo = sorted(redo)
    return report


def _rebuild_metadata(st: FeatureStore, names: Sequence[str]) -> list[str]:
    """Rewrites ``NAME/zarr.json`` of each array from the store's layout (what :func:`array_definitions`
    builds a new store with); chunk files are untouched, so intact data reads again."""
    definitions = array_definitions(st.layout)
    rebuilt = []
    with tempfile.TemporaryDirectory() as tmp:
        group = zarr.open_group(LocalStore(tmp), mode="w", zarr_format=3)
        for name in names:
            group.create_array(name, **definitions[name])
            data = (Path(tmp) / name / "zarr.json").read_bytes()
            if st.objects is not None:  # one PUT: the object is replaced whole or not at all
                st.objects.put(f"{name}/zarr.json", data)
            else:
                (st.path / name).mkdir(exist_ok=True)
                write_bytes_atomic(st.path / name / "zarr.json", data)
            rebuilt.append(f"{name}/zarr.json")
    return rebuilt

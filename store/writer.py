"""Writing one shard of a feature store: buffer clips, then make data durable before marking it done."""

from __future__ import annotations

import fcntl
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from foundation.atomic import fsync_file, fsync_folders, fsync_path, rename_into_place, temp_path
from store.fastio import is_raw, raw_chunk_bytes, read_shard, stage_raw_chunk
from store.objects import ObjectLease
from store.schema import (
    LOCK_DIR,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_MISSING,
    STRING_DTYPE,
    NonFiniteFeaturesError,
    ShardBusyError,
    StoreError,
    fill_nan,
    has_nonfinite,
    nonfinite_mask,
)

if TYPE_CHECKING:  # annotations only: feature_store imports this module, not the other way round
    from store.feature_store import FeatureStore

MAX_MESSAGE_CHARS = 4000


class FileLock:
    """An exclusive advisory ``flock`` on a lock file (released by the kernel even on SIGKILL)."""

    def __init__(self, lock_path: Path, shard: int) -> None:
        lock_path.parent.mkdir(exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise ShardBusyError(
                f"{lock_path.parent.parent}: shard {shard} is being written by another writer "
                f"(lock {lock_path}); two writers inside one shard would lose data"
            ) from e
        self.fd = fd

    def check(self) -> None:
        """A flock cannot be lost while its file descriptor is open."""

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _cast_into(row: np.ndarray, value: np.ndarray) -> None:
    """``row[...] = value`` cast to the row's dtype; float32 -> float16 with torch's vectorised cast (bit for
    bit numpy's, overflows to inf included; 8 against 237 µs for a ViT-B AM/12 clip's embeddings here)."""
    fast = value.dtype == np.float32 and row.dtype == np.float16 and value.dtype.isnative
    if fast and value.flags.writeable and min(value.strides, default=0) >= 0:  # what torch.from_numpy takes
        torch.from_numpy(row).copy_(torch.from_numpy(value))
        return
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(row, value, casting="unsafe")


def _acquire_shard_lock(store: FeatureStore, shard: int) -> FileLock | ObjectLease:
    """A folder's shards are locked with ``flock``, an object store's with a lease object."""
    key = f"{LOCK_DIR}/shard_{shard:06d}.lock"
    if store.objects is not None:
        return ObjectLease(store.objects, key, f"shard {shard}").acquire()
    return FileLock(store.path / key, shard)


class ShardWriter:
    """Owns one shard: ``put``/``fail`` buffer clips in memory, ``commit`` writes them crash-safely.

    Commit order: the shard's data files (whole-shard rewrite: written and fsync'd under temp names,
    renamed, folders fsync'd), the failure texts, and only then the shard's status chunk (its temp file
    written and fsync'd beside the data's, renamed last, folder fsync'd). A process killed at any point,
    or a power loss, leaves every clip marked done with its data on disk. ``commit_every=k`` commits
    after every k clips so a long shard keeps its work; each commit rewrites the shard (cost ~ shard size).
    Leaving the ``with`` block commits what is buffered, also when an exception ends it.
    """

    def __init__(
        self, store: FeatureStore, shard: int, *, commit_every: int | None = None, durable: bool = True
    ) -> None:
        store.require_writable()
        clips = store.clips_in_shard(shard)
        if commit_every is not None and commit_every < 1:
            raise StoreError(f"commit_every={commit_every}: expected a positive integer or None")
        self.store = store
        self.shard = shard
        self.start, self.stop = clips.start, clips.stop
        self.commit_every = commit_every
        self.durable = durable
        self._lock: FileLock | ObjectLease | None = _acquire_shard_lock(store, shard)
        try:
            self._remove_partial_files()
            self._status = read_shard(store, "status", shard).astype(np.int8, copy=False)
            self._committed_status = self._status.copy()
            # Rows no clip was put into yet: NaN-filled at commit, a pass over the buffer less than filling
            # a new shard's buffer first (a shard that every clip is put into is never filled).
            self._unwritten = np.full(len(self._status), not (self._status == STATUS_DONE).any())
            spare = store.spare_buffers.take(self._buffer_shapes())
            self._data = {name: self._load_data(name, spare) for name in store.data_arrays}
            self._types, self._messages = self._load_texts()
            self._committed_texts = (self._types.copy(), self._messages.copy())
        except BaseException:
            self._release()
            raise
        self._shapes = store.layout.clip_shapes()
        self._dtype = np.dtype(store.layout.dtype)
        self._uncommitted = 0
        self._data_dirty = False
        self._synced: set[str] = set()

    # ------------------------------------------------------------------ setup
    def _remove_partial_files(self) -> None:
        """Deletes the temp files a killed writer of this shard left beside its chunk files: ours
        (``.<chunk>.<pid>.partial``, ``foundation.atomic``) and Zarr's (``<chunk minus its last suffix>.<uuid>
        .partial``). Zarr's are left for 1-D arrays, where dropping the suffix drops the shard index (a
        temp file of a few bytes that another shard's writer may own). One listing per array folder.
        Object stores have no temp objects: a PUT is visible whole or not at all."""
        if self.store.objects is not None:
            return
        for name in (*self.store.data_arrays, "status", "failure_type", "failure_message"):
            chunk = self.store.chunk_file(name, self.shard)
            ours = f".{chunk.name}."
            zarrs = f"{chunk.stem}." if "." in chunk.stem else ours
            try:
                entries = list(os.scandir(chunk.parent))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.endswith(".partial") and entry.name.startswith((ours, zarrs)):
                    Path(entry.path).unlink(missing_ok=True)

    def _buffer_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of the shard buffer of every data array."""
        rows = self.stop - self.start
        return {
            name: ((rows, *self.store.array(name).shape[1:]), self.store.array(name).dtype)
            for name in self.store.data_arrays
        }

    def _load_data(self, name: str, spare: dict[str, np.ndarray] | None) -> np.ndarray:
        """The shard's done clips (resume) and NaN elsewhere, also over rows of an interrupted commit;
        unfilled (``_unwritten``) when no clip is done. Into a closed writer's buffer when given."""
        arr = self.store.array(name)
        buf = spare[name] if spare is not None else None
        if self._unwritten.all():
            return buf if buf is not None else np.empty((self.stop - self.start, *arr.shape[1:]), arr.dtype)
        return fill_nan(read_shard(self.store, name, self.shard, out=buf), self._status != STATUS_DONE)

    def _load_texts(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.stop - self.start
        if (self._status == STATUS_FAILED).any():
            t = np.asarray(self.store.array("failure_type")[self.start : self.stop], dtype=STRING_DTYPE)
            m = np.asarray(self.store.array("failure_message")[self.start : self.stop], dtype=STRING_DTYPE)
            return t.copy(), m.copy()
        return np.full(n, "", dtype=STRING_DTYPE), np.full(n, "", dtype=STRING_DTYPE)

    # ------------------------------------------------------------------ the writer's API
    def pending(self) -> np.ndarray:
        """Clip indices of this shard still to write (buffered clips count as written)."""
        return self.start + np.flatnonzero(self._status == STATUS_MISSING)

    def _local(self, index: int) -> int:
        if self._lock is None:
            raise StoreError(f"{self.store.path}: writer of shard {self.shard} is closed")
        if not self.start <= index < self.stop:
            raise IndexError(
                f"{self.store.path}: clip {index} is not in shard {self.shard} "
                f"(clips {self.start}..{self.stop - 1})"
            )
        return index - self.start

    def put(self, index: int, *, embeddings: Any, cls: Any, flow: Any = None) -> None:
        """Buffers clip ``index``: embeddings (A,V,T,r), cls (V,D), flow (Bf,V,T,h,N) when the store has flow.

        Raises ValueError for a wrong shape or a non-finite value after casting to the stored dtype.
        """
        k = self._local(int(index))
        given = {"embeddings": embeddings, "cls": cls, "flow": flow}
        if flow is not None and "flow" not in self._shapes:
            raise ValueError(f"{self.store.path}: clip {index}: flow given but the store has no flow array")
        values = {}
        for name, shape in self._shapes.items():
            if given[name] is None:
                raise ValueError(f"{self.store.path}: clip {index}: {name} missing (expected shape {shape})")
            value = values[name] = np.asarray(given[name])
            if value.shape != shape:
                raise ValueError(
                    f"{self.store.path}: clip {index}: {name} has shape {value.shape}, expected {shape}"
                )
        # Cast straight into the shard buffer (no temporary per clip); a rejected clip's rows are restored.
        before = {n: self._data[n][k].copy() for n in values} if self._status[k] == STATUS_DONE else None
        for name, value in values.items():
            row = self._data[name][k]
            _cast_into(row, value)
            if has_nonfinite(row):
                bad = int(nonfinite_mask(row).sum())
                for n in values:
                    if before is None:
                        fill_nan(self._data[n], k)
                    else:
                        self._data[n][k] = before[n]
                self._unwritten[k] = False
                raise NonFiniteFeaturesError(
                    f"{self.store.path}: clip {index} ({self.store.clip_ids[index]!s}): {name} has {bad} "
                    f"non-finite value(s) in {self._dtype} (NaN/inf, or beyond the dtype's range); "
                    "record it with fail()"
                )
        self._status[k] = STATUS_DONE
        self._unwritten[k] = False
        self._types[k] = ""
        self._messages[k] = ""
        self._data_dirty = True
        self._count_and_maybe_commit()

    def fail(self, index: int, error_type: str, message: str) -> None:
        """Records clip ``index`` as failed (e.g. an undecodable video) so a resume does not retry it."""
        k = self._local(int(index))
        if not error_type:
            raise ValueError(f"{self.store.path}: clip {index}: error_type must be a non-empty string")
        if self._status[k] == STATUS_DONE:
            for buf in self._data.values():
                fill_nan(buf, k)
            self._data_dirty = True
        self._status[k] = STATUS_FAILED
        self._types[k] = str(error_type)
        self._messages[k] = str(message)[:MAX_MESSAGE_CHARS]
        self._count_and_maybe_commit()

    def reset(self, index: int) -> None:
        """Marks clip ``index`` missing again (data NaN, no failure text): the next extraction redoes it."""
        k = self._local(int(index))
        for buf in self._data.values():
            fill_nan(buf, k)
        self._data_dirty = True
        self._status[k] = STATUS_MISSING
        self._types[k] = ""
        self._messages[k] = ""
        self._count_and_maybe_commit()

    def _count_and_maybe_commit(self) -> None:
        self._uncommitted += 1
        if self.commit_every is not None and self._uncommitted >= self.commit_every:
            self.commit()

    def commit(self) -> int:
        """Writes buffered clips crash-safely; returns how many clips changed status."""
        if self._lock is None:
            raise StoreError(f"{self.store.path}: writer of shard {self.shard} is closed")
        changed = int((self._status != self._committed_status).sum())
        if not changed and not self._data_dirty:
            self._uncommitted = 0
            return 0
        self._lock.check()
        if self._unwritten.any():  # rows never put read as NaN (filled now, not when the shard opened)
            for buf in self._data.values():
                fill_nan(buf, self._unwritten)
            self._unwritten[:] = False
        data = list(self._data) if self._data_dirty else []
        local = self.store.objects is None
        # In a folder the status file is written and fsync'd with the data's, under its temp name: only its
        # rename, last, makes it count.
        early = [*data, "status"] if local and is_raw(self.store.array("status")) else data
        try:
            self._write_data(data, early)
            # Clips going failed -> done keep their old failure text until their status says done.
            revived = (self._committed_status == STATUS_FAILED) & (self._status == STATUS_DONE)
            types = np.where(revived, self._committed_texts[0], self._types)
            messages = np.where(revived, self._committed_texts[1], self._messages)
            self._write_texts(types, messages)
            self._lock.check()  # a writer that lost its lease must not mark clips done
            if "status" in early:
                rename_into_place(self.store.chunk_file("status", self.shard))
                self._sync_folders("status")
            else:
                self._write("status", self._status)
                self._sync("status")
        finally:
            if local:  # temp files of a failed commit
                for name in early:
                    temp_path(self.store.chunk_file(name, self.shard)).unlink(missing_ok=True)
        if revived.any():
            self._write_texts(self._types, self._messages)
        self._committed_status = self._status.copy()
        self._uncommitted = 0
        self._data_dirty = False
        return changed

    def _write_data(self, data: list[str], early: list[str]) -> None:
        """Writes the files of ``early`` (the data arrays ``data``, and in a folder the status file). In a
        folder: every file written under its temp name, then all fsync'd at once (an fsync while a big
        write runs stalls the write on the file system's journal), the data files renamed onto their
        chunks and their folders fsync'd, so the data is durable before the status is renamed. On object
        storage: one PUT per array, concurrently."""
        if not early:
            return
        buffers = {**self._data, "status": self._status}
        with ThreadPoolExecutor(max_workers=len(early)) as pool:
            if self.store.objects is not None:
                list(pool.map(lambda n: self._write(n, buffers[n]), early))
                return
            staged = {n: self._write(n, buffers[n]) for n in early}
            if self.durable:
                files = [staged[n] or self.store.chunk_file(n, self.shard) for n in early]
                list(pool.map(fsync_file, files))
            for name in data:
                if staged[name] is not None:
                    rename_into_place(self.store.chunk_file(name, self.shard))
            list(pool.map(self._sync_folders, data))

    def _write(self, name: str, buf: np.ndarray) -> Path | None:
        """Writes the shard's rows of an array: in a folder a raw chunk file under its temp name (returned,
        for the caller to fsync and rename), any other array through Zarr (which renames its own temp
        file); on object storage one PUT (an object appears whole or not at all)."""
        arr = self.store.array(name)
        if is_raw(arr) and self.store.objects is not None:
            chunk = raw_chunk_bytes(buf, self.store.shard_clips, arr.fill_value)
            self.store.objects.put(self.store.chunk_key(name, self.shard), memoryview(chunk).cast("B"))
        elif is_raw(arr):
            chunk = self.store.chunk_file(name, self.shard)
            return stage_raw_chunk(chunk, buf, self.store.shard_clips, arr.fill_value)
        else:
            arr[self.start : self.stop] = buf
        return None

    def _write_texts(self, types: np.ndarray, messages: np.ndarray) -> None:
        sl = slice(self.start, self.stop)
        for name, new, old in (
            ("failure_type", types, self._committed_texts[0]),
            ("failure_message", messages, self._committed_texts[1]),
        ):
            if (new != old).any():
                self.store.array(name)[sl] = new
                self._sync(name)
        self._committed_texts = (types.copy(), messages.copy())

    def _sync(self, name: str) -> None:
        """fsyncs the shard file, then its folder (the rename; see ``_sync_folders``)."""
        if self.durable and self.store.objects is None:  # an object store's PUT is durable when it returns
            fsync_path(self.store.chunk_file(name, self.shard))
            self._sync_folders(name)

    def _sync_folders(self, name: str) -> None:
        """fsyncs the folder of the shard file (its rename); the first time also the folders up to the
        array's (stores with nested chunk keys create folders)."""
        if self.durable and self.store.objects is None:
            folder = self.store.chunk_file(name, self.shard).parent
            fsync_folders(folder, folder if name in self._synced else self.store.path / name)
            self._synced.add(name)

    # ------------------------------------------------------------------ lifetime
    def _release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()
            self.store.spare_buffers.give(getattr(self, "_data", {}))
            self._data = {}

    def close(self) -> None:
        """Commits what is buffered and releases the shard."""
        if self._lock is None:
            return
        try:
            self.commit()
        finally:
            self._release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._release()


class SpareBuffers:
    """Shard buffers of closed writers, handed to the store's next writer of a shard of the same shape:
    filling a new 32 MiB buffer faults in every page first (a third of a shard write's CPU time here)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: list[dict[str, np.ndarray]] = []
        self._lock = threading.Lock()

    def take(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray] | None:
        """Buffers with exactly these shapes and dtypes, or None."""
        with self._lock:
            for k, buffers in enumerate(self._free):
                if buffers.keys() == shapes.keys() and all(
                    (b.shape, b.dtype) == shapes[n] for n, b in buffers.items()
                ):
                    return self._free.pop(k)
        return None

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return SpareBuffers, (self.keep,)  # a pickled store (e.g. sent to a worker) starts with none

    def give(self, buffers: dict[str, np.ndarray]) -> None:
        """Keeps a closed writer's buffers (at most ``keep`` sets) for the next writer."""
        with self._lock:
            if buffers and len(self._free) < self.keep:
                self._free.append(buffers)


class BackgroundCommits:
    """Closes (commits) shard writers on background threads, so the next shard's clips are computed while
    the last shards' files are written and fsync'd. The order inside a commit is unchanged (data, then
    status), so a crash still leaves every clip marked done with its data on disk; different shards'
    commits touch different files and may run at once.

    ``close(writer)`` first waits while ``max_pending`` writers are still committing (each holds its
    shard's buffers in memory) and re-raises their errors; ``wait()`` waits for all. Leaving the ``with``
    block waits for every commit (and re-raises a failure unless another exception is already on its way);
    ``shutdown()`` lets them finish without raising.
    Measured with ``benchmarks/store_throughput.py``: writes ~1.5x faster than closing in line; two commits
    at once overlap one's fsyncs with the other's writes (on a loaded 2-core machine 255 against 363 ms
    for 152 MB in 8 shards, ``np.save`` 179 ms).
    """

    def __init__(self, max_pending: int = 2) -> None:
        self.max_pending = max(1, max_pending)
        self._pool = ThreadPoolExecutor(max_workers=self.max_pending, thread_name_prefix="shard-commit")
        self._pending: deque[Future[None]] = deque()

    def close(self, writer: ShardWriter) -> None:
        """Hands ``writer`` to the background thread to commit and release its shard."""
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(writer.close))

    def wait(self) -> None:
        """Waits for every handed-over commit; re-raises the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def shutdown(self) -> None:
        """Lets every handed-over commit finish (each writer releases its lock) without raising their
        errors, for a caller already handling one; stops the thread."""
        for future in self._pending:
            future.exception()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundCommits:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.shutdown()

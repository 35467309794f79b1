"""The one shard reader of the store's out-of-core readers (``FeatureDataset``, stage 2's streamed batches).

``read_shard_arrays`` reads the selected arrays of one shard (``store.fastio``: plain-bytes shards straight
into the arrays, one GET or one concurrent multi-range GET per shard on object storage); ``ShardCache``
holds at most ``capacity`` shards and reads the planned ones ahead on background threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from store.reader import read_shard

ShardRead = Callable[[int, "dict[str, np.ndarray] | None"], "dict[str, np.ndarray]"]


def read_shard_arrays(
    store: Any,  # a FeatureStore
    axis1: Mapping[str, Sequence[int] | None],
    shard: int,
    spare: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays ``axis1`` names of one shard (positions ``axis1[name]`` of axis 1, None = all), read
    into the arrays of ``spare`` (a dropped shard) when their shapes fit. Whole rows from object storage
    are read-only views of their GET's buffer instead (no copy; the readers only read them)."""
    rows = len(store.clips_in_shard(shard))
    out = {}
    for name, sel in axis1.items():
        buf = spare.get(name) if spare else None
        buf = buf if buf is not None and buf.shape[0] == rows and buf.flags.writeable else None
        out[name] = read_shard(store, name, shard, out=buf, axis1=sel, read_only=store.objects is not None)
    return out


class ShardCache:
    """Shards read on background threads in a planned order, at most ``capacity`` held at a time.

    ``plan`` gives the coming uses (shard, clips); a shard is dropped once its planned clips are used, and
    the next planned shards are read ahead into the freed room. Unplanned shards are read on demand and
    evicted least recently used first. The arrays of a dropped shard are reused for the next read (fresh
    25-100 MB arrays cost a page fault per 4 KiB page on every read).
    """

    def __init__(self, read: ShardRead, capacity: int, threads: int) -> None:
        self._read = read
        self.capacity = max(1, capacity)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="shard-read")
        self._held: OrderedDict[int, Future] = OrderedDict()
        self._queue: list[int] = []
        self._remaining: dict[int, int] = {}
        self._spare: list[dict[str, np.ndarray]] = []
        self._lock = threading.Lock()

    def _submit(self, shard: int) -> None:
        spare = self._spare.pop() if self._spare else None
        self._held[shard] = self._pool.submit(self._read, shard, spare)

    def _drop(self, shard: int) -> None:
        future = self._held.pop(shard, None)
        if future is not None and future.done() and future.exception() is None and len(self._spare) < 2:
            arrays = future.result()
            if all(a.flags.writeable for a in arrays.values()):  # not a GET's own buffer: reusable
                self._spare.append(arrays)

    def plan(self, shards: np.ndarray, counts: np.ndarray) -> None:
        with self._lock:
            self._queue = [int(s) for s in shards][::-1]  # popped from the end
            self._remaining = {int(s): int(c) for s, c in zip(shards, counts, strict=True)}
            for s in [s for s in self._held if s not in self._remaining]:
                self._drop(s)
            self._fill()

    def _fill(self) -> None:
        while self._queue and len(self._held) < self.capacity:
            s = self._queue.pop()
            if s not in self._held:
                self._submit(s)

    def get(self, shard: int) -> dict[str, np.ndarray]:
        with self._lock:
            if shard not in self._held:
                while len(self._held) >= self.capacity:
                    unplanned = [s for s in self._held if s not in self._remaining]
                    self._drop(unplanned[0] if unplanned else next(iter(self._held)))
                self._submit(shard)
            self._held.move_to_end(shard)
            future = self._held[shard]
        return future.result()

    def used(self, shard: int, clips: int) -> None:
        with self._lock:
            if shard in self._remaining:
                self._remaining[shard] -= clips
                if self._remaining[shard] <= 0:
                    del self._remaining[shard]
                    self._drop(shard)
                    self._fill()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._held.clear()

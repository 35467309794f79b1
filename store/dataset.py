"""A torch ``Dataset`` over a feature store's done clips, and a sampler that reads shard by shard."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from store.feature_store import STATUS_DONE, FeatureStore
from store.reader import load_arrays, read_shard, selected_shape, selections

DEFAULT_MEMORY_FRACTION = 0.5  # of the RAM available when the dataset is made


def default_memory_limit() -> int:
    """Half the RAM available now (psutil, which dask.distributed brings; 8 GiB if it is missing)."""
    try:
        import psutil
    except ImportError:
        return 8 * 2**30
    return int(DEFAULT_MEMORY_FRACTION * psutil.virtual_memory().available)


class FeatureDataset(Dataset):
    """Done clips of a store as items ``{embeddings, cls[, flow], label, index}`` (float32 tensors).

    ``in_memory=None`` loads everything when it needs at most ``memory_limit_bytes`` (stored dtype;
    default half the RAM available now);
    otherwise clips are read shard by shard with an LRU cache of ``cache_shards`` shards, so a
    shard-ordered order (:class:`ShardOrderedSampler`) reads each shard once per epoch. Indexing with a
    list of items returns a stacked batch, which is the fast way to train::

        loader = DataLoader(ds, sampler=ShardOrderedSampler(ds, batch_size=64), batch_size=None)
    """

    def __init__(
        self,
        store: FeatureStore | str | Path,
        *,
        adapters: Sequence[str | int] | None = None,
        flow_blocks: Sequence[str | int] | None = None,
        with_flow: bool = False,
        in_memory: bool | None = None,
        memory_limit_bytes: int | None = None,
        cache_shards: int = 2,
    ) -> None:
        st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.path = st.path
        self.with_flow = with_flow
        self._sel = selections(st, adapters, flow_blocks, with_flow)
        self.adapters = list(self._sel["embeddings"] or range(len(st.adapter_names)))
        self.adapter_names = [st.adapter_names[i] for i in self.adapters]
        self.indices = np.flatnonzero(st.status() == STATUS_DONE).astype(np.int64)
        self.labels = st.labels[self.indices]
        self.shard_clips = st.shard_clips
        per_clip = 0
        for name, s in self._sel.items():
            per_clip += int(np.prod(selected_shape(st, name, s))) * st.array(name).dtype.itemsize
        self.nbytes = per_clip * len(self.indices)
        limit = default_memory_limit() if memory_limit_bytes is None else memory_limit_bytes
        self.in_memory = self.nbytes <= limit if in_memory is None else bool(in_memory)
        self.cache_shards = max(1, int(cache_shards))
        self._arrays: dict[str, np.ndarray] = {}
        if self.in_memory:
            loaded = load_arrays(st, adapters=adapters, flow_blocks=flow_blocks, with_flow=with_flow)
            self._arrays = {n: getattr(loaded, n) for n in self._sel}
            self.indices, self.labels = loaded.indices, loaded.labels  # the same status read as the data
        self._store: FeatureStore | None = st
        self._pid = os.getpid()
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.indices)

    def shard_of_items(self) -> np.ndarray:
        """Shard of every item (for shard-ordered sampling)."""
        return self.indices // self.shard_clips

    def _handle(self) -> FeatureStore:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid, self._cache = FeatureStore.open(self.path), os.getpid(), OrderedDict()
        return self._store

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        st = self._handle()
        data = {}
        for name, s in self._sel.items():
            data[name] = read_shard(st, name, shard, axis1=s)
        self._cache[shard] = data
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return data

    def _gather(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of the selected arrays for dataset positions ``items`` (stored dtype)."""
        if self.in_memory:
            return {name: a[items] for name, a in self._arrays.items()}
        index = self.indices[items]
        shards = index // self.shard_clips
        rows: dict[str, np.ndarray] = {}
        for shard in dict.fromkeys(shards.tolist()):  # shards in order of first use
            data = self._shard(shard)
            hit = shards == shard
            for name, block in data.items():
                if name not in rows:
                    rows[name] = np.empty((len(items), *block.shape[1:]), dtype=block.dtype)
                rows[name][hit] = block[index[hit] - shard * self.shard_clips]
        return rows

    def __getitem__(self, item: int | Sequence[int] | np.ndarray) -> dict[str, Any]:
        single = isinstance(item, (int, np.integer))
        items = np.atleast_1d(np.asarray(item, dtype=np.int64))
        if len(items) and not ((items >= -len(self)) & (items < len(self))).all():
            raise IndexError(f"{self.path}: item {item} out of range for {len(self)} done clips")
        items = items % max(1, len(self))
        out: dict[str, Any] = {
            name: torch.from_numpy(rows.astype(np.float32)) for name, rows in self._gather(items).items()
        }
        out["label"] = torch.from_numpy(self.labels[items])
        out["index"] = torch.from_numpy(self.indices[items])
        if single:
            out = {name: value[0] for name, value in out.items()}
            out["index"] = int(out["index"])
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"], state["_cache"] = None, OrderedDict()
        return state


class ShardOrderedSampler(Sampler):
    """Random order that visits shards one at a time (shards shuffled, clips shuffled inside a shard).

    With a :class:`FeatureDataset` read out of core, each shard is read once per epoch. With
    ``batch_size`` it yields lists of items (batches), for ``DataLoader(..., batch_size=None)``.
    ``set_epoch(e)`` changes the order reproducibly, as ``DistributedSampler`` does.
    """

    def __init__(
        self,
        dataset: FeatureDataset,
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer or None")
        self.shards = dataset.shard_of_items()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of epoch ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.shards)
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> np.ndarray:
        """This epoch's order of dataset items."""
        items = np.arange(len(self.shards))
        if not self.shuffle or not len(items):
            return items
        rng = np.random.default_rng([self.seed, self.epoch])
        unique = np.unique(self.shards)
        shard_rank = np.zeros(int(unique.max()) + 1, dtype=np.int64)
        shard_rank[unique] = rng.permutation(len(unique))
        return items[np.lexsort((rng.random(len(items)), shard_rank[self.shards]))]

    def __iter__(self) -> Iterator[int] | Iterator[list[int]]:
        order = self.order()
        if self.batch_size is None:
            return iter(order.tolist())
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        return iter(order[k : k + self.batch_size].tolist() for k in range(0, stop, self.batch_size))

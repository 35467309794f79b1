"""Stage 2 out of core: batches streamed from a store under a memory budget, in a shard-ordered shuffle.

``open_features`` returns the in-memory ``CachedFeatures`` when the selected arrays fit the budget and a
``StreamedFeatures`` otherwise; both offer what training and evaluation use (``batch``, ``epoch_order``,
``eval_batches``, ``select`` and the shape properties), so ``train_heads`` and ``evaluate_heads`` run on
either. A streamed epoch shuffles the shards, cuts them into windows of ``window_shards`` shards and
shuffles the clips of each window (with one window covering every shard it is exactly the in-memory
``torch.randperm`` order); background threads read the shards of the coming window while the current
one is trained on, so at most ``cache_shards`` shards (the budget) are held at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundation.features import ClipFeatures
from stage2_temporal.training.data import CachedFeatures, load_store, num_classes_of
from store.budget import StoreSelection, parse_memory_budget, store_selection
from store.dataset import float32_batch, source_tensor
from store.objects import default_read_threads
from store.reader import resolve_selection, selected_shape
from store.shards import ShardCache, read_shard_arrays

log = logging.getLogger(__name__)


def open_features(
    path: str | Path,
    adapters: Sequence[int | str] | str = "all",
    flow_blocks: Sequence[int | str] | str = "all",
    with_flow: bool = False,
    memory_budget: int | None = None,
    progress: bool = True,
) -> CachedFeatures | StreamedFeatures:
    """The store's selected arrays in memory when they fit ``memory_budget`` bytes, else streamed."""
    budget = parse_memory_budget(memory_budget)
    sel = store_selection(path, adapters, flow_blocks, with_flow)
    if sel.nbytes <= budget:
        return load_store(path, adapters, flow_blocks, with_flow=with_flow, progress=progress)
    log.info(
        "%s: the selected arrays need %.2f GB, more than the memory budget of %.2f GB: streaming them",
        path,
        sel.nbytes / 1e9,
        budget / 1e9,
    )
    return StreamedFeatures(path, adapters, flow_blocks, with_flow=with_flow, memory_budget=budget)


def split_budget(train: StoreSelection, val: StoreSelection, budget: int) -> tuple[int, int]:
    """Budget for the training and validation features: both whole when they fit together; else the
    validation store whole if it takes at most a quarter, the rest streamed for training."""
    if train.nbytes + val.nbytes <= budget:
        return budget, budget
    if val.nbytes <= budget // 4:
        return budget - val.nbytes, val.nbytes
    return budget - budget // 4, budget // 4


@dataclass
class StreamedFeatures:
    """The labelled done clips of a store, read shard by shard as batches ask for them (out of core).

    Same interface as :class:`CachedFeatures` for training and evaluation. ``memory_budget`` bounds the
    bytes of shards held (``cache_shards``); ``window_shards`` (default half of them) are shuffled
    together per epoch; ``read_threads`` read ahead (default 2 from a folder, 8 from object storage).
    """

    path: str | Path
    adapters: Sequence[int | str] | str = "all"
    flow_blocks: Sequence[int | str] | str = "all"
    with_flow: bool = False
    memory_budget: int = 2**30
    window_shards: int | None = None
    read_threads: int | None = None
    _cache: ShardCache | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from store import FeatureStore

        st = FeatureStore.open(self.path, mode="r")
        self.source = str(self.path)
        a = resolve_selection("adapters", st.adapter_names, self.adapters)
        if self.with_flow and not st.has_flow:
            raise ValueError(
                f"{self.path}: AM-flow maps are asked for but the store holds none "
                "(extract with flow maps stored, or set heads.flow_maps=false)"
            )
        f = (
            resolve_selection("flow_blocks", st.flow_block_names, self.flow_blocks)
            if self.with_flow
            else None
        )
        self._keep_adapters = bool(a)
        self.adapter_names = [st.adapter_names[i] for i in a]
        self.flow_block_names = [st.flow_block_names[i] for i in f] if f is not None else []
        done = st.status() == 1
        labels = st.labels
        self.indices = np.flatnonzero(done & (labels >= 0)).astype(np.int64)
        if not len(self.indices):
            raise ValueError(f"{self.path}: no done, labelled clip to read ({st.counts()})")
        self.labels = labels[self.indices].astype(np.int64)
        self.shard_clips = st.shard_clips
        self.shards = self.indices // self.shard_clips
        self.num_classes = num_classes_of(st, self.labels)
        self.class_names = st.class_names
        self.flow_geometry = [st.flow_geometry[i] for i in f] if f is not None else []
        self.clip_ids = [str(c) for c in st.clip_ids[self.indices]]
        self.fingerprint_fields = st.fingerprint_fields
        layout = st.layout
        self.num_views, self.num_frames = layout.num_views, layout.num_frames
        self.embed_dim, self.cls_dim = layout.embed_dim, layout.cls_dim
        self._packed = layout.flow_packed
        self.flow_heads = self.flow_geometry[0].channels if f is not None else 0
        flow_shape = selected_shape(st, "flow", f) if f is not None else None
        self.flow_map_shape = (
            tuple(flow_shape[1:] if self._packed else flow_shape[2:]) if f is not None else None
        )
        self._dtype = np.dtype(layout.dtype)
        sel = store_selection(self.path, a, f or [], f is not None)
        self._axis1 = sel.axis1
        self.shard_bytes = sel.shard_bytes
        self.cache_shards = max(2, self.memory_budget // max(1, self.shard_bytes))
        if self.shard_bytes * 2 > self.memory_budget:
            log.warning(
                "%s: a shard of the selected arrays takes %.0f MB; holding 2 exceeds the memory budget",
                self.path,
                self.shard_bytes / 1e6,
            )
        if self.window_shards is None:
            self.window_shards = max(1, self.cache_shards // 2)

    # ------------------------------------------------------------------ what CachedFeatures offers
    @property
    def num_clips(self) -> int:
        return len(self.indices)

    def select(
        self,
        adapters: Sequence[int | str] | str = "all",
        flow_blocks: Sequence[int | str] | str = "all",
        with_flow: bool = True,
    ) -> StreamedFeatures:
        """The same clips with a subset of this selection's adapters / flow blocks (by name or position)."""
        a = resolve_selection("adapters", self.adapter_names, adapters)
        names = [self.adapter_names[i] for i in a]
        if with_flow and not self.with_flow:
            raise ValueError(
                f"{self.source}: AM-flow maps are asked for but this cache holds none "
                "(extract with flow maps stored, or set heads.flow_maps=false)"
            )
        blocks = (
            [
                self.flow_block_names[i]
                for i in resolve_selection("flow_blocks", self.flow_block_names, flow_blocks)
            ]
            if with_flow
            else []
        )
        if names == self.adapter_names and with_flow == self.with_flow and blocks == self.flow_block_names:
            return self
        return replace(self, adapters=names, flow_blocks=blocks, with_flow=with_flow)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """This epoch's order of clips: shards shuffled, clips shuffled within windows of shards (one
        window over every shard = ``torch.randperm``, the in-memory order); the reads are planned."""
        unique = np.unique(self.shards)
        if self.window_shards >= len(unique):
            order = torch.randperm(self.num_clips, generator=generator)
        else:
            rank = np.empty(int(unique.max()) + 1, dtype=np.int64)
            rank[unique] = torch.randperm(len(unique), generator=generator).numpy()
            window = rank[self.shards] // self.window_shards
            parts = []
            for w in range(int(window.max()) + 1):
                members = np.flatnonzero(window == w)
                parts.append(members[torch.randperm(len(members), generator=generator).numpy()])
            order = torch.from_numpy(np.concatenate(parts))
        self._plan(order.numpy(), 1)
        return order

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, int]]:
        """(clips, view) batches covering every clip in every view, each shard read once."""
        self._plan(np.arange(self.num_clips), self.num_views)
        for start in range(0, self.num_clips, batch_size):
            clips = torch.arange(start, min(start + batch_size, self.num_clips))
            for view in range(self.num_views):
                yield clips, view

    def batch(
        self, clips: np.ndarray | torch.Tensor, views: np.ndarray | torch.Tensor, device: torch.device | str
    ) -> ClipFeatures:
        """The float32 ``ClipFeatures`` of clip ``clips[i]`` seen in view ``views[i]``, on ``device``.

        On CUDA the rows are gathered in the stored dtype into one pinned host buffer per array, copied
        asynchronously and cast to float32 on the device.
        """
        pos = np.asarray(clips, dtype=np.int64).reshape(-1)
        view = np.asarray(views, dtype=np.int64).reshape(-1)
        index = self.indices[pos]
        shard = index // self.shard_clips
        local = index - shard * self.shard_clips
        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()
        # CPU: each row is cast straight from the shard into the float32 batch (torch's vectorised cast,
        # one copy; numpy allocates it: huge pages); CUDA: rows go into a pinned buffer in the stored
        # dtype, cast on the device.
        host: dict[str, torch.Tensor] = {}
        cache = self._reader()
        for s in dict.fromkeys(shard.tolist()):
            data = cache.get(s)
            hit = np.flatnonzero(shard == s)
            for name, block in data.items():
                views_first = name == "cls" or (name == "flow" and self._packed)  # (clips, V, ...)
                if name not in host:
                    row_shape = block.shape[2:] if views_first else block.shape[1:2] + block.shape[3:]
                    host[name] = (
                        torch.empty((len(pos), *row_shape), dtype=_torch_dtype(self._dtype), pin_memory=True)
                        if pin
                        else float32_batch(len(pos), row_shape)
                    )
                out, src = host[name], source_tensor(block)
                for j in hit.tolist():
                    out[j].copy_(src[local[j], view[j]] if views_first else src[local[j], :, view[j]])
            cache.used(s, len(hit))
        out = {n: t.to(device, non_blocking=pin).to(torch.float32) for n, t in host.items()}
        emb = out["embeddings"] if self._keep_adapters else out["embeddings"][:, :0]
        return ClipFeatures(embeddings=emb, cls=out["cls"], flow=out.get("flow"))

    # ------------------------------------------------------------------ reading
    def _reader(self) -> ShardCache:
        if self._cache is None:
            from store import FeatureStore

            self._store = FeatureStore.open(self.path, mode="r")
            store, axis1 = self._store, self._axis1
            threads = self.read_threads or default_read_threads(store)
            self._cache = ShardCache(
                lambda shard, spare: read_shard_arrays(store, axis1, shard, spare), self.cache_shards, threads
            )
        return self._cache

    def _plan(self, order: np.ndarray, uses_per_clip: int) -> None:
        shard = self.shards[order]
        first = np.unique(shard, return_index=True)[1]
        sequence = shard[np.sort(first)]
        counts = np.bincount(shard, minlength=int(shard.max()) + 1)[sequence] * uses_per_clip
        self._reader().plan(sequence, counts)

    def close(self) -> None:
        """Stops the read-ahead threads and drops the held shards."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        state.pop("_store", None)
        return state

    def __del__(self) -> None:
        if getattr(self, "_cache", None) is not None:
            self._cache._pool.shutdown(wait=False, cancel_futures=True)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


def open_pair(
    train_path: str | Path,
    val_path: str | Path,
    adapters: Sequence[int | str] | str = "all",
    flow_blocks: Sequence[int | str] | str = "all",
    with_flow: bool = False,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> tuple[CachedFeatures | StreamedFeatures, CachedFeatures | StreamedFeatures]:
    """Training and validation features under one memory budget (``split_budget``)."""
    budget = parse_memory_budget(memory_budget)
    t = store_selection(train_path, adapters, flow_blocks, with_flow)
    v = store_selection(val_path, adapters, flow_blocks, with_flow)
    tb, vb = split_budget(t, v, budget)
    return (
        open_features(train_path, adapters, flow_blocks, with_flow, tb, progress),
        open_features(val_path, adapters, flow_blocks, with_flow, vb, progress),
    )


def features_as_tensors(data: CachedFeatures, device: torch.device | str) -> CachedFeatures:
    """The same clips with their arrays as tensors on ``device`` (stored dtype); batches are then gathered
    there, with no host copy per step."""

    def move(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(np.ascontiguousarray(array)).to(device)

    return replace(data, embeddings=move(data.embeddings), cls=move(data.cls), flow=move(data.flow))


def hold_on_device(
    data: CachedFeatures | StreamedFeatures, device: torch.device | str, max_fraction: float = 0.5
) -> CachedFeatures | StreamedFeatures:
    """In-memory features moved to a CUDA ``device`` when they take at most ``max_fraction`` of its free
    memory (small heads then never wait for host-to-device copies); otherwise returned unchanged."""
    device = torch.device(device)
    if not isinstance(data, CachedFeatures) or device.type != "cuda" or not torch.cuda.is_available():
        return data
    nbytes = sum(a.nbytes for a in (data.embeddings, data.cls, data.flow) if a is not None)
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > max_fraction * free:
        log.info(
            "%s: %.2f GB do not fit in %.0f%% of the free GPU memory; kept on the host",
            data.source,
            nbytes / 1e9,
            100 * max_fraction,
        )
        return data
    return features_as_tensors(data, device)

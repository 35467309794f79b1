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
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stage1_extract.amflow_model import ClipFeatures
from stage2_temporal.data import CachedFeatures, load_store
from store.reader import resolve_selection

log = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.5
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9})


def available_memory() -> int:
    """Bytes of RAM available to new allocations now (psutil, which dask.distributed brings)."""
    import psutil

    return int(psutil.virtual_memory().available)


def parse_memory_budget(text: str | int | None) -> int:
    """``"1GB"``, ``"512MiB"``, ``"2e9"`` or a fraction of the available RAM (``"0.25"``) -> bytes.

    None means half the RAM available now.
    """
    if text is None:
        return int(DEFAULT_BUDGET_FRACTION * available_memory())
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    try:
        value = float(m.group(1)) if m else math.nan
    except ValueError:
        value = math.nan
    if not m or unit not in _UNITS or math.isnan(value):
        raise ValueError(
            f"--memory-budget {text!r}: expected bytes with a unit (e.g. 1GB, 512MiB) or a fraction of "
            "the available RAM in (0, 1]"
        )
    if not math.isfinite(value):
        raise ValueError(f"--memory-budget {text!r}: must be a finite size")
    if not unit and 0 < value <= 1:
        return int(value * available_memory())
    if value <= 0:
        raise ValueError(f"--memory-budget {text!r}: must be positive")
    return int(value * _UNITS[unit])


@dataclass
class StoreSelection:
    """What one run reads from a store: the selected adapters / flow blocks, and their size."""

    path: Path
    adapters: list[int]
    flow_blocks: list[int] | None  # None = no flow maps
    num_clips: int  # done, labelled clips
    clip_bytes: int  # bytes per clip of the selected arrays (stored dtype)
    shard_bytes: int

    @property
    def nbytes(self) -> int:
        return self.num_clips * self.clip_bytes


def store_selection(
    path: str | Path,
    adapters: Sequence[int | str] | str = "all",
    flow_blocks: Sequence[int | str] | str = "all",
    with_flow: bool = False,
) -> StoreSelection:
    """The bytes a selection of a store needs in memory, read from its layout and status (no data read)."""
    from store import FeatureStore

    st = FeatureStore.open(path, mode="r")
    a = resolve_selection("adapters", st.adapter_names, adapters)
    f = resolve_selection("flow_blocks", st.flow_block_names, flow_blocks) if with_flow else None
    shapes = st.layout.clip_shapes()
    item = np.dtype(st.layout.dtype).itemsize
    per = {
        "embeddings": math.prod(shapes["embeddings"]) // shapes["embeddings"][0] * max(1, len(a)),
        "cls": math.prod(shapes["cls"]),
    }
    if f is not None and "flow" in shapes:
        per["flow"] = math.prod(shapes["flow"]) // shapes["flow"][0] * len(f)
    clip_bytes = item * sum(per.values())
    done = (st.status() == 1) & (st.labels >= 0)
    return StoreSelection(Path(path), a, f, int(done.sum()), clip_bytes, clip_bytes * st.shard_clips)


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


class _ShardCache:
    """Shards read on background threads in a planned order, at most ``capacity`` held at a time.

    ``plan`` gives the coming uses (shard, clips); a shard is dropped once its planned clips are used, and
    the next planned shards are read ahead into the freed room. Unplanned shards are read on demand and
    evicted least recently used first. The arrays of a dropped shard are reused for the next read (fresh
    25-100 MB arrays cost a page fault per 4 KiB page on every read).
    """

    def __init__(self, read, capacity: int, threads: int) -> None:
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
            self._spare.append(future.result())

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


@dataclass
class StreamedFeatures:
    """The labelled done clips of a store, read shard by shard as batches ask for them (out of core).

    Same interface as :class:`CachedFeatures` for training and evaluation. ``memory_budget`` bounds the
    bytes of shards held (``cache_shards``); ``window_shards`` (default half of them) are shuffled
    together per epoch; ``read_threads`` read ahead.
    """

    path: str | Path
    adapters: Sequence[int | str] | str = "all"
    flow_blocks: Sequence[int | str] | str = "all"
    with_flow: bool = False
    memory_budget: int = 2**30
    window_shards: int | None = None
    read_threads: int = 2
    _cache: _ShardCache | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from store import FeatureStore

        st = FeatureStore.open(self.path, mode="r")
        self.source = str(self.path)
        prov = st.provenance
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
        self._axis1 = {"embeddings": a or [0], "cls": None}
        if f is not None:
            self._axis1["flow"] = f
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
        class_names = prov.get("classes")
        num_classes = prov.get("num_classes") or (len(class_names) if class_names else None)
        self.num_classes = int(num_classes if num_classes is not None else self.labels.max() + 1)
        self.class_names = list(class_names) if class_names else None
        grid = prov.get("patch_grid")
        self.patch_grid = tuple(grid) if grid else None
        self.num_prefix_tokens = int(prov.get("num_prefix_tokens", 1))
        self.clip_ids = [str(c) for c in st.clip_ids[self.indices]]
        self.fingerprint_fields = st.fingerprint_fields
        layout = st.layout
        self.num_views, self.num_frames = layout.num_views, layout.num_frames
        self.embed_dim, self.cls_dim = layout.embed_dim, layout.cls_dim
        self.flow_heads = layout.flow_shape[1] if f is not None else 0
        self.flow_map_shape = (layout.num_frames, *layout.flow_shape[1:]) if f is not None else None
        self._dtype = np.dtype(layout.dtype)
        self.shard_bytes = store_selection(self.path, a, f or [], f is not None).shard_bytes
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
        # one copy); CUDA: rows go into a pinned buffer in the stored dtype, cast on the device.
        dtype = _torch_dtype(self._dtype) if pin else torch.float32
        host: dict[str, torch.Tensor] = {}
        cache = self._reader()
        for s in dict.fromkeys(shard.tolist()):
            data = cache.get(s)
            hit = np.flatnonzero(shard == s)
            for name, block in data.items():
                if name not in host:
                    row_shape = block.shape[1:2] + block.shape[3:] if name != "cls" else block.shape[2:]
                    host[name] = torch.empty((len(pos), *row_shape), dtype=dtype, pin_memory=pin)
                out = host[name]
                for j in hit.tolist():
                    row = block[local[j], view[j]] if name == "cls" else block[local[j], :, view[j]]
                    out[j].copy_(torch.from_numpy(row))
            cache.used(s, len(hit))
        out = {n: t.to(device, non_blocking=pin).to(torch.float32) for n, t in host.items()}
        emb = out["embeddings"] if self._keep_adapters else out["embeddings"][:, :0]
        return ClipFeatures(embeddings=emb, cls=out["cls"], flow=out.get("flow"))

    # ------------------------------------------------------------------ reading
    def _read_shard(self, shard: int, spare: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The selected arrays of one shard, into the arrays of a dropped shard when they fit."""
        from store.reader import read_shard

        st = self._store
        rows = len(st.clips_in_shard(shard))
        out = {}
        for name, sel in self._axis1.items():
            buf = spare.get(name) if spare else None
            buf = buf if buf is not None and buf.shape[0] == rows else None
            out[name] = read_shard(st, name, shard, out=buf, axis1=sel)
        return out

    def _reader(self) -> _ShardCache:
        if self._cache is None:
            from store import FeatureStore

            self._store = FeatureStore.open(self.path, mode="r")
            self._cache = _ShardCache(self._read_shard, self.cache_shards, self.read_threads)
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

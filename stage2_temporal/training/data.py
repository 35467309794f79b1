"""Cached clips in memory for stage 2: read a store once, then batch by index (no decoding, no re-reading).

``CachedFeatures`` lays every array out clip-major with the view axis second (``embeddings`` (clips, V,
A, T, r), ``cls`` (clips, V, D), ``flow`` (clips, V, F, T, h, N), or packed (clips, V, T, M) when the flow
blocks' maps differ in shape, as the store keeps them) so one fancy index ``[clips, views]`` gives a batch
in the ``ClipFeatures`` layout. Arrays keep the store's dtype (float16 halves the memory
of a Smarthome-size cache); each batch is cast to float32 on its way to the device, which is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundation.features import ClipFeatures
from store.layout import FlowBlock
from store.reader import flow_columns, resolve_selection

log = logging.getLogger(__name__)


@dataclass
class CachedFeatures:
    """Labelled clips of a cache held in memory, plus what is needed to build heads for them."""

    embeddings: np.ndarray  # (clips, views, adapters, T, r)
    cls: np.ndarray  # (clips, views, D)
    labels: np.ndarray  # (clips,) int64 class indices
    num_classes: int
    adapter_names: list[str]
    flow: np.ndarray | None = None  # (clips, views, flow_blocks, T, heads, N), or packed (clips, views, T, M)
    flow_block_names: list[str] = field(default_factory=list)
    flow_geometry: list[FlowBlock] = field(default_factory=list)  # map geometry per flow block
    class_names: list[str] | None = None
    clip_ids: list[str] | None = None
    fingerprint_fields: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        n, v, a = self.embeddings.shape[:3]
        where = self.source
        if self.embeddings.ndim != 5:
            raise ValueError(
                f"{where}: embeddings: expected (clips, views, adapters, T, r), got {self.embeddings.shape}"
            )
        if self.cls.shape[:2] != (n, v) or self.cls.ndim != 3:
            raise ValueError(f"{where}: cls: expected ({n}, {v}, D), got {self.cls.shape}")
        if self.labels.shape != (n,):
            raise ValueError(f"{where}: labels: expected ({n},), got {self.labels.shape}")
        if n and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"{where}: labels must be in [0, {self.num_classes}), got "
                f"{self.labels.min()}..{self.labels.max()}"
            )
        if len(self.adapter_names) != a:
            raise ValueError(f"{where}: {len(self.adapter_names)} adapter names for {a} adapters")
        if self.flow is not None:
            packed = self.flow.ndim == 4
            if self.flow.ndim not in (4, 6) or self.flow.shape[:2] != (n, v):
                raise ValueError(
                    f"{where}: flow: expected ({n}, {v}, blocks, T, heads, N) or packed ({n}, {v}, T, M), "
                    f"got {self.flow.shape}"
                )
            if packed and not self.flow_geometry:
                raise ValueError(f"{where}: packed flow maps (clips, views, T, M) need each block's geometry")
            blocks = len(self.flow_geometry) if packed else self.flow.shape[2]
            if len(self.flow_block_names) != blocks:
                raise ValueError(
                    f"{where}: {len(self.flow_block_names)} flow block names for {blocks} blocks"
                )
            if self.flow_geometry and len(self.flow_geometry) != blocks:
                raise ValueError(
                    f"{where}: {len(self.flow_geometry)} flow block geometries for {blocks} blocks"
                )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{where}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def num_clips(self) -> int:
        return self.embeddings.shape[0]

    @property
    def num_views(self) -> int:
        return self.embeddings.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.embeddings.shape[-1]

    @property
    def cls_dim(self) -> int:
        return self.cls.shape[-1]

    @property
    def flow_heads(self) -> int:
        """Map channels of the first flow block (0 without flow)."""
        return (
            0
            if self.flow is None
            else self.flow_geometry[0].channels
            if self.flow_geometry
            else self.flow.shape[4]
        )

    @property
    def num_frames(self) -> int:
        return self.embeddings.shape[3]

    @property
    def flow_map_shape(self) -> tuple[int, ...] | None:
        """(T, heads, N) of the flow maps ((T, M) when packed), None without them."""
        if self.flow is None:
            return None
        return tuple(self.flow.shape[2:] if self.flow.ndim == 4 else self.flow.shape[3:])

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """A training epoch's order of clips (a random permutation)."""
        return torch.randperm(self.num_clips, generator=generator)

    def eval_batches(self, batch_size: int):
        """(clips, view) batches covering every clip in every view."""
        for view in range(self.num_views):
            for start in range(0, self.num_clips, batch_size):
                yield torch.arange(start, min(start + batch_size, self.num_clips)), view

    @classmethod
    def from_clip_features(
        cls,
        views: ClipFeatures | Sequence[ClipFeatures],
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_classes: int,
        adapter_names: Sequence[str],
        flow_block_names: Sequence[str] = (),
        **kwargs: Any,
    ) -> CachedFeatures:
        """From ``model.extract`` outputs (one ``ClipFeatures`` per view), as stage 1 would cache them."""
        views = [views] if isinstance(views, ClipFeatures) else list(views)

        def stack(get) -> np.ndarray:
            return torch.stack([get(f).detach().cpu() for f in views], dim=1).numpy()

        has_flow = views[0].flow is not None
        return cls(
            embeddings=stack(lambda f: f.embeddings),
            cls=stack(lambda f: f.cls),
            flow=stack(lambda f: f.flow) if has_flow else None,
            labels=np.asarray(labels, dtype=np.int64),
            num_classes=num_classes,
            adapter_names=list(adapter_names),
            flow_block_names=list(flow_block_names) if has_flow else [],
            **kwargs,
        )

    def select(
        self,
        adapters: Sequence[int | str] | str = "all",
        flow_blocks: Sequence[int | str] | str = "all",
        with_flow: bool = True,
    ) -> CachedFeatures:
        """The same clips with a subset of adapters / flow blocks (no copy when everything is kept)."""
        a = resolve_selection("adapters", self.adapter_names, adapters)
        emb = self.embeddings if a == list(range(len(self.adapter_names))) else self.embeddings[:, :, a]
        flow, names = None, []
        if with_flow:
            if self.flow is None:
                raise ValueError(
                    f"{self.source}: AM-flow maps are asked for but this cache holds none "
                    "(extract with flow maps stored, or set heads.flow_maps=false)"
                )
            f = resolve_selection("flow_blocks", self.flow_block_names, flow_blocks)
            names = [self.flow_block_names[i] for i in f]
            blocks = [self.flow_geometry[i] for i in f] if self.flow_geometry else []
            if f == list(range(len(self.flow_block_names))):
                flow = self.flow
            elif self.flow.ndim == 4:  # packed: the selected blocks' columns, still packed
                flow = self.flow[..., flow_columns(self.flow_geometry, f)]
            else:
                flow = self.flow[:, :, f]
        return replace(
            self,
            embeddings=emb,
            adapter_names=[self.adapter_names[i] for i in a],
            flow=flow,
            flow_block_names=names,
            flow_geometry=blocks if with_flow else [],
        )

    def batch(
        self, clips: np.ndarray | torch.Tensor, views: np.ndarray | torch.Tensor, device: torch.device | str
    ) -> ClipFeatures:
        """The float32 ``ClipFeatures`` of clip ``clips[i]`` seen in view ``views[i]``, on ``device``."""
        clips, views = torch.as_tensor(clips), torch.as_tensor(views)

        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()

        def take(array: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
            if array is None:
                return None
            if isinstance(array, torch.Tensor):  # held on the device (stream.hold_on_device)
                return array[clips.to(array.device), views.to(array.device)].to(device, torch.float32)
            rows = torch.from_numpy(array)[clips, views]
            rows = rows.pin_memory() if pin else rows  # stored dtype: half the bytes to copy for float16
            return rows.to(device, non_blocking=pin).to(torch.float32)

        return ClipFeatures(embeddings=take(self.embeddings), cls=take(self.cls), flow=take(self.flow))


def num_classes_of(store: Any, labels: np.ndarray) -> int:
    """A store's class count (its class names); from the labels, with a warning, when it records none."""
    if store.num_classes is not None:
        return int(store.num_classes)
    count = int(labels.max()) + 1
    log.warning("%s: records no classes; assuming %d from the labels", store.path, count)
    return count


def store_name(path: str | Path) -> str:
    """A store's short name for file names: ``/data/test.zarr`` -> ``test``."""
    p = Path(path)
    return p.name[: -len(p.suffix)] if p.suffix else p.name


def load_store(
    path: str | Path,
    adapters: Sequence[int | str] | str = "all",
    flow_blocks: Sequence[int | str] | str = "all",
    with_flow: bool = False,
    progress: bool = True,
) -> CachedFeatures:
    """Reads the done, labelled clips of a feature store into memory once, in the stored dtype."""
    from store import FeatureStore, load_arrays

    st = FeatureStore.open(path, mode="r")
    if with_flow and not st.has_flow:
        raise ValueError(
            f"{path}: AM-flow maps are asked for but the store holds none "
            "(extract with flow maps stored, or set heads.flow_maps=false)"
        )
    a = resolve_selection("adapters", st.adapter_names, adapters)
    f = resolve_selection("flow_blocks", st.flow_block_names, flow_blocks) if with_flow else None
    # the store reads at least one adapter; a run without adapter heads keeps none of them
    arrays = load_arrays(st, adapters=a or [0], flow_blocks=f, with_flow=with_flow, progress=progress)
    labelled = arrays.labels >= 0
    if not labelled.any():
        raise ValueError(f"{path}: no done, labelled clip to read ({st.counts()})")
    if not labelled.all():
        log.warning("%s: %d done clips have no label (-1); they are left out", path, int((~labelled).sum()))

    def rows(array: np.ndarray | None, views_first: bool = False) -> np.ndarray | None:
        """Labelled clips only (no copy when all are), views moved to axis 1 (a view, no copy)."""
        if array is None:
            return None
        array = array if labelled.all() else array[labelled]
        return array if views_first else array.swapaxes(1, 2)

    embeddings = rows(arrays.embeddings)
    if not a:
        embeddings = embeddings[:, :, :0]
    packed = arrays.flow is not None and arrays.flow.ndim == 4
    return CachedFeatures(
        embeddings=embeddings,
        cls=rows(arrays.cls, views_first=True),
        flow=rows(arrays.flow, views_first=packed),
        labels=arrays.labels[labelled].astype(np.int64),
        num_classes=num_classes_of(st, arrays.labels),
        adapter_names=[st.adapter_names[i] for i in a],
        flow_block_names=arrays.flow_block_names,
        flow_geometry=arrays.flow_geometry,
        class_names=st.class_names,
        clip_ids=[str(c) for c in arrays.clip_ids[labelled]],
        fingerprint_fields=st.fingerprint_fields,
        source=str(path),
    )


def store_fingerprint_fields(path: str | Path) -> dict[str, Any]:
    """The settings a store's features were made with (what two stores must share to be compared)."""
    from store import FeatureStore

    return FeatureStore.open(path, mode="r").fingerprint_fields


def check_same_features(path: str | Path, expected_fields: dict[str, Any], force: bool = False) -> list[str]:
    """Refuses a store made with other feature settings, naming each differing field; ``force`` only warns."""
    from store import FeatureStore, check_fingerprint

    return check_fingerprint(FeatureStore.open(path, mode="r"), expected_fields, force=force)

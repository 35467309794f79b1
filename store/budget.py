"""How much a stage-2 reader may hold in memory, and how much a selection of a store needs.

The one place that turns ``--memory-budget`` text into bytes, computes the default budget (half the RAM
available now) and the bytes per clip of a selection of arrays; ``store.dataset.FeatureDataset`` and
``stage2_temporal.training.stream`` both decide "in memory or streamed" with these.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from store.feature_store import FeatureStore
from store.reader import resolve_selection, selected_shape
from store.schema import STATUS_DONE

DEFAULT_BUDGET_FRACTION = 0.5  # of the RAM available now
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9})


def available_memory() -> int:
    """Bytes of RAM available to new allocations now (psutil, which dask.distributed brings)."""
    import psutil

    return int(psutil.virtual_memory().available)


def default_memory_budget() -> int:
    """The budget when none is given: half the RAM available now."""
    return int(DEFAULT_BUDGET_FRACTION * available_memory())


def parse_memory_budget(text: str | int | None) -> int:
    """``"1GB"``, ``"512MiB"``, ``"2e9"`` or a fraction of the available RAM (``"0.25"``) -> bytes.

    None means :func:`default_memory_budget`.
    """
    if text is None:
        return default_memory_budget()
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


def clip_bytes(store: FeatureStore, axis1: Mapping[str, Sequence[int] | None]) -> int:
    """Bytes of one clip of the arrays ``axis1`` names (stored dtype), each restricted to the positions
    ``axis1[name]`` of its axis 1 (None = the whole axis), as ``store.reader.read_shard`` reads them."""
    return sum(
        np.dtype(store.array(name).dtype).itemsize * math.prod(selected_shape(store, name, sel))
        for name, sel in axis1.items()
    )


@dataclasses.dataclass
class StoreSelection:
    """What one run reads from a store: the selected adapters / flow blocks, and their size."""

    path: str | Path  # a folder or an s3:// URL
    adapters: list[int]
    flow_blocks: list[int] | None  # None = no flow maps
    num_clips: int  # done, labelled clips
    clip_bytes: int  # bytes per clip of the selected arrays (stored dtype)
    shard_bytes: int

    @property
    def nbytes(self) -> int:
        return self.num_clips * self.clip_bytes

    @property
    def axis1(self) -> dict[str, list[int] | None]:
        """The axis-1 positions read per array (``selection_axis1``)."""
        return selection_axis1(self.adapters, self.flow_blocks)


def selection_axis1(adapters: list[int], flow_blocks: list[int] | None) -> dict[str, list[int] | None]:
    """Axis-1 positions a stage-2 selection reads per array; with no adapter selected one is still read
    (stage 2 drops it), so a batch keeps its clip axis."""
    out: dict[str, list[int] | None] = {"embeddings": adapters or [0], "cls": None}
    if flow_blocks is not None:
        out["flow"] = flow_blocks
    return out


def store_selection(
    path: str | Path,
    adapters: Sequence[int | str] | str = "all",
    flow_blocks: Sequence[int | str] | str = "all",
    with_flow: bool = False,
) -> StoreSelection:
    """The bytes a selection of a store's done, labelled clips needs in memory (layout and status only)."""
    st = FeatureStore.open(path, mode="r")
    a = resolve_selection("adapters", st.adapter_names, adapters)
    f = resolve_selection("flow_blocks", st.flow_block_names, flow_blocks) if with_flow else None
    f = f if st.has_flow else None
    per_clip = clip_bytes(st, selection_axis1(a, f))
    done = (st.status() == STATUS_DONE) & (st.labels >= 0)
    return StoreSelection(path, a, f, int(done.sum()), per_clip, per_clip * st.shard_clips)

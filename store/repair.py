"""Finding done clips whose data is damaged (unreadable shard files, NaN/inf values, all zeros) and
handing them back to extraction (``amflow store repair``): their status returns to missing, so the same
``amflow extract`` command re-extracts exactly those clips.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from store.fastio import read_shard
from store.feature_store import STATUS_DONE, FeatureStore, nonfinite_mask

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
    names = [n for n in (arrays or st.data_arrays) if n in st.data_arrays]
    done = st.status() == STATUS_DONE
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


def repair_store(store: FeatureStore | str | Path, *, progress: bool = False) -> list[int]:
    """Marks every damaged done clip missing again (its data NaN) so extraction redoes it; returns them.

    An unreadable shard file is deleted first (it reads as NaN afterwards), so all done clips of that
    shard are redone. Writes through the shard writer: the same locks and commit order as extraction.
    """
    st = store if isinstance(store, FeatureStore) else FeatureStore.open(store, mode="r+")
    st.require_writable()
    scan = scan_clips(st, progress=progress)
    for name, shards in scan.unreadable.items():
        for shard, _ in shards:
            st.delete_chunk(name, shard)
    by_shard: dict[int, list[int]] = {}
    for i in scan.damaged:
        by_shard.setdefault(st.shard_of(i), []).append(i)
    for shard, clips in by_shard.items():
        with st.shard_writer(shard) as writer:
            for i in clips:
                writer.reset(i)
    return scan.damaged

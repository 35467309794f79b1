"""Synthetic caches for tests and benchmarks: classes told apart only by temporal order (or by flow).

Every clip's adapter sequences are the same two prototype vectors, half of the frames each, in a
class-specific order plus noise: the mean over time is the same for every class, so only a head that reads
the order beats chance. The last-frame CLS is noise. The AM-flow maps carry the class as the patch where
"motion" is, so flow-map heads alone can learn it. ``write_store`` writes a cache through the store's
writer API, as stage 1 does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stage2_temporal.training.data import CachedFeatures
from store.layout import FlowBlock


def order_patterns(num_classes: int, num_frames: int) -> np.ndarray:
    """(C, T) 0/1 patterns with T/2 ones each, all distinct: which prototype each frame shows."""
    patterns = []
    for ones in itertools.combinations(range(num_frames), num_frames // 2):
        p = np.zeros(num_frames, dtype=np.int64)
        p[list(ones)] = 1
        patterns.append(p)
        if len(patterns) == num_classes:
            return np.stack(patterns)
    raise ValueError(
        f"num_classes={num_classes}: at most {len(patterns)} orders exist for {num_frames} frames"
    )


def synthetic_cache(
    num_clips: int,
    seed: int,
    num_classes: int = 4,
    num_views: int = 1,
    num_adapters: int = 3,
    num_frames: int = 4,
    embed_dim: int = 8,
    cls_dim: int = 16,
    flow_blocks: int = 2,
    flow_heads: int = 3,
    patch_grid: tuple[int, int] = (2, 2),
    noise: float = 0.5,
    dtype: str = "float16",
    task_seed: int = 1234,
) -> CachedFeatures:
    """A cache whose labels are learnable from temporal order (and from the flow maps' location)."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(task_seed).normal(size=(2, embed_dim))
    patterns = order_patterns(num_classes, num_frames)
    labels = rng.integers(0, num_classes, num_clips)
    shape = (num_clips, num_views, num_adapters, num_frames, embed_dim)
    embeddings = rng.normal(scale=noise, size=shape).astype(np.float32)
    embeddings += prototypes[patterns[labels]][:, None, None]
    tokens = 1 + patch_grid[0] * patch_grid[1]
    flow = None
    if flow_blocks:
        flow = rng.random((num_clips, num_views, flow_blocks, num_frames, flow_heads, tokens)).astype(
            np.float32
        )
        moving = 1 + labels % (tokens - 1)  # the class's patch (token 0 is the CLS prefix token)
        flow[np.arange(num_clips), ..., moving] += 2.0
    return CachedFeatures(
        embeddings=embeddings.astype(dtype),
        cls=rng.normal(size=(num_clips, num_views, cls_dim)).astype(dtype),
        flow=None if flow is None else flow.astype(dtype),
        labels=labels.astype(np.int64),
        num_classes=num_classes,
        adapter_names=[f"block{1 + i // 2}.{('attn', 'mlp')[i % 2]}" for i in range(num_adapters)],
        flow_block_names=[f"block{i + 1}" for i in range(flow_blocks)],
        flow_geometry=[FlowBlock(flow_heads, tokens, patch_grid, 1)] * flow_blocks,
        class_names=[f"order{c}" for c in range(num_classes)],
        clip_ids=[f"clip{seed}_{i:05d}.mp4" for i in range(num_clips)],
        source=f"<synthetic seed={seed}>",
    )


def write_store(
    cache: CachedFeatures,
    path: str | Path,
    fingerprint_fields: Mapping[str, Any],
    dtype: str = "float16",
    shard_clips: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a cache as a feature store (``FeatureStore.create`` + shard writers), provenance included
    (``provenance`` adds to what the cache records, e.g. ``train_views``)."""
    from store import FeatureStore

    provenance = {**(provenance or {}), "source": cache.source}
    store = FeatureStore.create(
        path,
        clip_ids=cache.clip_ids or [f"clip{i:06d}" for i in range(cache.num_clips)],
        labels=cache.labels,
        num_adapters=len(cache.adapter_names),
        num_views=cache.num_views,
        num_frames=cache.embeddings.shape[3],
        embed_dim=cache.embed_dim,
        cls_dim=cache.cls_dim,
        provenance=provenance,
        fingerprint_fields=dict(fingerprint_fields),
        flow_blocks=cache.flow_geometry if cache.flow is not None else None,
        class_names=cache.class_names or [f"class{c}" for c in range(cache.num_classes)],
        dtype=dtype,
        shard_clips=shard_clips,
        adapter_names=cache.adapter_names,
        flow_block_names=cache.flow_block_names if cache.flow is not None else None,
    )
    packed = cache.flow is not None and cache.flow.ndim == 4  # (clips, V, T, M) is the store's own order
    for shard in range(store.num_shards):
        with store.shard_writer(shard, durable=False) as writer:
            for i in store.clips_in_shard(shard):
                writer.put(
                    i,
                    embeddings=cache.embeddings[i].swapaxes(0, 1),
                    cls=cache.cls[i],
                    flow=None
                    if cache.flow is None
                    else cache.flow[i]
                    if packed
                    else cache.flow[i].swapaxes(0, 1),
                )
    return Path(path)

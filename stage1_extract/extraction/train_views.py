"""Augmented training views for the cache (``amflow extract --train-views K``).

Test-time views (middle frame per segment, centre crop) never show the heads the random temporal and
spatial sampling that end-to-end training uses. With ``K`` training views a clip is decoded ``K`` times as
training samples it: a random frame per segment (uniform sampling) or a random start (dense), a random
crop (``train_crop: random``) and, with probability ``flip``, a horizontal flip (leave it 0 for classes
whose meaning flips, e.g. "moving left"). View ``k`` of the clip at store index ``i`` comes from
``numpy.random.default_rng((seed, i, k))``: the same store whatever the batching, workers or resumes.
The views fill the store's view axis; stage 2 draws one per clip per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stage1_extract.videos.bucket import VideoBytes, clip_name, clip_source
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import DEFAULT_MAX_VIDEO_MB, ClipRecord
from stage1_extract.videos.video import DECODE_ERRORS, clip_error, decode_views
from store.objects import is_url
from store.schema import StoreError


def train_views(
    path: str | Path | VideoBytes,
    geometry: ClipGeometry,
    *,
    views: int,
    flip: float,
    seed: int,
    clip_index: int,
    start_frame: int | None = None,
    end_frame: int | None = None,
) -> torch.Tensor:
    """``views`` augmented training samples of one video, uint8 ``(views, T, 3, crop, crop)``."""
    out = []
    for k in range(views):
        rng = np.random.default_rng((seed, clip_index, k))
        view = decode_views(path, geometry, train=True, rng=rng, start_frame=start_frame, end_frame=end_frame)
        if flip > 0 and rng.random() < flip:
            view = view.flip(-1)
        out.append(view)
    return torch.cat(out)


class TrainViewsDataset(Dataset):
    """Like ``VideoClipDataset`` (same items), each clip as ``views`` augmented training views.

    ``clip_indices[j]`` is record j's index in the store, which seeds its views.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        clip_indices: Sequence[int],
        root: str | Path,
        geometry: ClipGeometry,
        *,
        views: int,
        flip: float = 0.0,
        seed: int = 0,
        max_video_mb: float = DEFAULT_MAX_VIDEO_MB,
    ) -> None:
        if views < 1:
            raise ValueError(f"--train-views {views}: expected a positive number of views")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"--train-flip {flip}: expected a probability in [0, 1]")
        self.records, self.clip_indices = list(records), [int(i) for i in clip_indices]
        self.root, self.geometry = (root if is_url(root) else Path(root)), geometry
        self.max_video_bytes = int(max_video_mb * 2**20)
        self.views, self.flip, self.seed = views, flip, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        item: dict[str, Any] = {"video": None, "label": record.label, "index": index, "path": record.path}
        try:  # a path leaving the root is refused; a bucket's video is fetched once for all its views
            item["video"] = train_views(
                clip_source(self.root, record.path, self.max_video_bytes),
                self.geometry,
                views=self.views,
                flip=self.flip,
                seed=self.seed,
                clip_index=self.clip_indices[index],
                start_frame=record.start_frame,
                end_frame=record.end_frame,
            )
            item["error"] = None
        except StoreError:  # the bucket itself failed (endpoint, credentials): stop, a resume redoes the clip
            raise
        except DECODE_ERRORS as e:
            item["error"] = clip_error(e, clip_name(self.root, record.path))
        return item

"""Which frames of a video make a clip (METHOD.md section 6), and how views are ordered.

Temporal sampling returns an integer array ``(num_clips, T)`` of frame indices into the video. With a
``numpy.random.Generator`` the sampling is random (training); without one it is deterministic (testing).

Views: a clip's ``V = num_clips * num_crops`` views are ordered clip-major, ``v = clip * num_crops + crop``
(crops: 0 = start, 1 = centre, 2 = end along the long side; one crop is the centre). Each view holds
``T`` frames, so a decoded clip is ``(V, T, 3, H, W)``: frames x crops x clips.

Short videos never fail: uniform sampling repeats frames (segments shorter than one frame reuse the
nearest earlier frame), dense sampling clamps indices past the end to the last frame.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class SegmentOutsideVideo(ValueError):
    """An annotated segment that starts after the video's last frame (recorded as the clip's failure)."""


def _check(num_video_frames: int, num_frames: int, num_clips: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"video has {num_video_frames} frames; expected at least 1")
    if num_frames < 1 or num_clips < 1:
        raise ValueError(f"num_frames and num_clips must be >= 1, got {num_frames} and {num_clips}")


def uniform_indices(
    num_video_frames: int,
    num_frames: int,
    *,
    num_clips: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """TSN sampling: ``num_frames`` equal segments, one frame from each.

    Segment i covers frames ``[floor(i*n/T), floor((i+1)*n/T))``. Random: a uniform frame of each segment.
    Deterministic: clip k of K takes the frame at fraction ``(k + 1/2) / K`` of each segment (K = 1: the
    middle frame), so several test clips interleave inside the segments.
    """
    _check(num_video_frames, num_frames, num_clips)
    n, t = num_video_frames, num_frames
    i = np.arange(t)
    start = (i * n) // t
    length = np.maximum(((i + 1) * n) // t - start, 1)
    if rng is not None:
        return start[None, :] + rng.integers(0, length[None, :], size=(num_clips, t))
    k = np.arange(num_clips)[:, None]
    return start[None, :] + (length[None, :] * (2 * k + 1)) // (2 * num_clips)


def dense_indices(
    num_video_frames: int,
    num_frames: int,
    frame_interval: int,
    *,
    num_clips: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Dense sampling: ``num_frames`` frames ``frame_interval`` apart from a start frame.

    A clip spans ``(T-1)*interval + 1`` frames, leaving ``M = n - span + 1`` valid starts (at least 1).
    Random: a uniform start in ``[0, M)``. Deterministic: clip k of K starts at ``floor(M*(2k+1)/(2K))``,
    the centres of K equal parts of the valid starts. Indices past the end are clamped to the last frame.
    """
    _check(num_video_frames, num_frames, num_clips)
    if frame_interval < 1:
        raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
    span = (num_frames - 1) * frame_interval + 1
    valid_starts = max(num_video_frames - span + 1, 1)
    if rng is not None:
        starts = rng.integers(0, valid_starts, size=num_clips)
    else:
        starts = (valid_starts * (2 * np.arange(num_clips) + 1)) // (2 * num_clips)
    indices = starts[:, None] + np.arange(num_frames)[None, :] * frame_interval
    return np.minimum(indices, num_video_frames - 1)


class Sampling(Protocol):
    """What sampling reads of a dataset config or a ``ClipGeometry``."""

    num_frames: int
    sampling: str
    frame_interval: int
    num_clips: int
    num_crops: int


def clip_indices(
    num_video_frames: int,
    cfg: Sampling,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    start_frame: int | None = None,
    end_frame: int | None = None,
    source: str = "video",
) -> np.ndarray:
    """Frame indices ``(clips, T)`` for one video under ``cfg``'s sampling.

    Training: one random clip (``rng`` required). Testing: ``cfg.num_clips`` deterministic clips. An
    optional segment ``[start_frame, end_frame)`` (Diving48, lists) is sampled inside; one that ends after
    the video is cut at its end with a warning, one that starts after it is a ``SegmentOutsideVideo``
    (a clip of copies of the last frame would be stored silently otherwise). ``source`` names the video.
    """
    if train and rng is None:
        raise ValueError("clip_indices: train=True needs an rng (numpy.random.Generator)")
    if num_video_frames > 0 and start_frame is not None and start_frame >= num_video_frames:
        raise SegmentOutsideVideo(
            f"{source}: segment [{start_frame}, {end_frame}) starts after the video's last frame "
            f"{num_video_frames - 1}"
        )
    if num_video_frames > 0 and end_frame is not None and end_frame > num_video_frames:
        log.warning(
            "%s: segment [%s, %d) ends after the video's %d frames: sampled inside [%s, %d)",
            source,
            start_frame or 0,
            end_frame,
            num_video_frames,
            start_frame or 0,
            num_video_frames,
        )
    first = min(max(start_frame or 0, 0), num_video_frames - 1) if num_video_frames > 0 else 0
    last = num_video_frames if end_frame is None else min(end_frame, num_video_frames)
    length = max(last - first, 1) if num_video_frames > 0 else 0
    num_clips = 1 if train else cfg.num_clips
    generator = rng if train else None
    if cfg.sampling == "uniform":
        idx = uniform_indices(length, cfg.num_frames, num_clips=num_clips, rng=generator)
    else:
        idx = dense_indices(length, cfg.num_frames, cfg.frame_interval, num_clips=num_clips, rng=generator)
    return idx + first


def num_views(cfg: Sampling, train: bool) -> int:
    """Views per clip: 1 in training, ``num_clips * num_crops`` at test time."""
    return 1 if train else cfg.num_clips * cfg.num_crops


def view_index(clip: int, crop: int, num_crops: int) -> int:
    """Position of (temporal clip, spatial crop) among a clip's views: clip-major."""
    if not 0 <= crop < num_crops:
        raise ValueError(f"crop {crop} outside 0..{num_crops - 1}")
    return clip * num_crops + crop

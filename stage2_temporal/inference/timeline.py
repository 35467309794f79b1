"""Long videos scored over time: sliding windows, each sampled as the run's clips were, as a timeline.

A window ``[start, start + window)`` seconds becomes the frame segment ``[round(start * fps),
round((start + window) * fps))`` of the video, which the run's sampling (uniform or dense, its clips and
crops) reads exactly as it read a trimmed clip. Windows start every ``stride`` seconds; the last one ends
at or before the video's end (a video shorter than one window is one window).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stage1_extract.videos.datasets import ClipRecord
from stage1_extract.videos.video import DECODE_ERRORS, open_video
from stage2_temporal.inference.predict import Predictor, VideoPrediction, predict_records, write_top_k_csv


def video_duration(path: str | Path) -> tuple[int, float]:
    """(frame count, frames per second) of a video, from decord's index (nothing decoded)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    reader = open_video(path)
    frames, fps = len(reader), float(reader.get_avg_fps())
    if frames < 1 or not fps > 0:
        raise ValueError(f"{path}: no frames or no frame rate ({frames} frames, {fps} fps)")
    return frames, fps


MAX_WINDOWS = 10_000  # per video: more is a stride far below a frame, or a mistake; refused, not planned


def window_starts(duration: float, window: float, stride: float) -> np.ndarray:
    """Start times (seconds) of the windows over ``duration``: every ``stride``, the last ending in time."""
    if not (window > 0 and stride > 0 and np.isfinite(window) and np.isfinite(stride)):
        raise ValueError(f"--window and --stride must be finite and > 0 seconds, got {window} and {stride}")
    if duration <= window:
        return np.zeros(1)
    count = int(np.floor((duration - window) / stride + 1e-9)) + 1
    if count > MAX_WINDOWS:
        least = (duration - window) / (MAX_WINDOWS - 1)
        digits = 2 - math.floor(math.log10(least))  # rounded up to 3 significant digits: it is enough
        least = math.ceil(least * 10**digits) / 10**digits
        raise ValueError(
            f"--stride {stride:g}: {count:,} windows of {window:g} s over {duration:.1f} s, more than "
            f"{MAX_WINDOWS:,}; use a larger --stride (at least "
            f"{least:g} s)"
        )
    return np.arange(count) * stride


@dataclass
class TimelinePlan:
    """The windows of one video (seconds), planned before anything is decoded; ``error`` if unreadable."""

    video: str
    spans: list[tuple[float, float]] = field(default_factory=list)
    fps: float = 0.0
    error: str | None = None


def plan_timeline(video: str, window: float, stride: float) -> TimelinePlan:
    """Reads the video's length (its index, nothing decoded) and plans the windows; too many is an error."""
    try:
        frames, fps = video_duration(video)
    except DECODE_ERRORS as e:
        return TimelinePlan(video, error=f"{type(e).__name__}: {e}")
    duration = frames / fps
    try:
        starts = window_starts(duration, window, stride)
    except ValueError as e:
        raise ValueError(f"{video}: {e}") from None
    return TimelinePlan(video, [(float(s), float(min(s + window, duration))) for s in starts], fps)


def predict_timeline(
    predictor: Predictor,
    plan: TimelinePlan,
    batch_size: int = 8,
    decode_workers: int = 2,
    progress: bool = True,
) -> list[VideoPrediction]:
    """Scores the planned windows of one video; returns one prediction per window, in time order."""
    if plan.error is not None:
        return [VideoPrediction(plan.video, error=plan.error)]
    fps = plan.fps
    records = [
        ClipRecord(plan.video, -1, int(round(s * fps)), max(int(round(e * fps)), int(round(s * fps)) + 1))
        for s, e in plan.spans
    ]
    results = predict_records(predictor, records, batch_size, decode_workers, progress, desc="windows")
    return [
        VideoPrediction(plan.video, probs, err, s, e) for (s, e), (probs, err) in zip(plan.spans, results)
    ]


def timeline_paths(videos: Sequence[str], out: str | Path | None = None) -> list[Path]:
    """Where each video's timeline CSV goes (its PNG beside it): ``out`` for one video, else
    ``<stem>_timeline.csv`` in the current folder; videos whose stems collide (``a/clip.mp4``,
    ``b/clip.mp4``) are named by their path below their common folder (``a_clip_timeline.csv``)."""
    if out is not None:
        if len(videos) > 1:
            raise ValueError("--out with --window takes one video (each video gets its own timeline)")
        return [Path(out)]
    stems = [Path(v).stem for v in videos]
    names = list(stems)
    for stem in set(stems):
        same = [i for i, s in enumerate(stems) if s == stem]
        if len(same) < 2:
            continue
        paths = [os.path.abspath(videos[i]) for i in same]
        common = os.path.commonpath([os.path.dirname(p) for p in paths])
        for i, p in zip(same, paths):
            names[i] = "_".join(Path(os.path.relpath(p, common)).with_suffix("").parts)
    return [Path(f"{name}_timeline.csv") for name in names]


def plot_timeline(
    windows: Sequence[VideoPrediction], class_names: Sequence[str], path: str | Path, top: int = 5
) -> Path:
    """The probabilities over time (window centres) of the ``top`` classes most probable in any window."""
    from stage2_temporal.training.plots import _pyplot

    plt = _pyplot()
    scored = [w for w in windows if w.probs is not None]
    if not scored:
        raise ValueError(f"{windows[0].video if windows else '?'}: no window could be decoded")
    probs = np.stack([w.probs for w in scored])
    centres = [(w.start + w.end) / 2 for w in scored]
    shown = np.argsort(-probs.max(axis=0), kind="stable")[:top]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for c in shown:
        ax.plot(centres, probs[:, c], marker="o", markersize=3, label=class_names[c])
    ax.set_xlabel("time (s, window centre)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(Path(scored[0].video).name)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_timeline(
    windows: Sequence[VideoPrediction], class_names: Sequence[str], csv_path: str | Path
) -> tuple[Path, Path]:
    """The timeline CSV (``video,start,end,label1,prob1,...``) and its PNG beside it (same stem)."""
    csv_path = Path(csv_path)
    write_top_k_csv(windows, class_names, csv_path)
    return csv_path, plot_timeline(windows, class_names, csv_path.with_suffix(".png"))

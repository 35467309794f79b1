"""Synthetic motion videos: classes that differ only in how an object moves, written as real mp4 files.

Each clip shows one object of random shape, texture, colour and size on a random plain or textured
background, moving ``left``/``right``/``up``/``down`` or ``approach``/``recede`` (growing/shrinking),
optionally filmed by a panning camera (the whole scene drifts in a random direction). The scene wraps
around the frame edges (a torus), and every clip's size and position are drawn at a random reference
time, so a single frame says almost nothing about the class: only the motion does. Used by the tests and
by ``amflow demo``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from foundation.atomic import atomic_path, write_text_atomic

MOTIONS = ("left", "right", "up", "down", "approach", "recede")
_DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
_SPLIT_NUMBERS = {"train": 0, "val": 1, "test": 2}


def video_codec() -> str:
    """The encoder ``write_video`` uses: libx264 when this PyAV build has it, else mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: str | Path, frames: np.ndarray, fps: int = 25, crf: int = 18, faststart: bool = False
) -> Path:
    """Writes uint8 RGB frames ``(T, H, W, 3)`` as an mp4 (yuv420p, single-threaded; the same bytes on
    every call at ``crf=0`` only: at crf 18 libx264's output for the same frames varied between calls).

    H and W must be even (yuv420p). ``crf`` sets libx264's quality (lower = closer to the input);
    ``faststart`` puts the index (moov atom) before the frames, as streaming files have it.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video: expected uint8 frames (T, H, W, 3) with T >= 1, got {frames.dtype} "
                         f"{frames.shape}")  # fmt: skip
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_video: frame size {height}x{width} must be even for yuv420p")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = video_codec()
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            stream.bit_rate = 8 * width * height * fps
        for frame in frames:
            # RGB -> YUV in one swscale thread: PyAV's default (one per CPU) gave other pixels now and
            # then under load, so two runs of the demo wrote different videos for a few clips
            rgb = av.VideoFrame.from_ndarray(frame, format="rgb24")
            container.mux(stream.encode(rgb.reformat(format="yuv420p", threads=1)))
        container.mux(stream.encode())
    return path


def write_corrupt_video(path: str | Path, seed: int = 0, num_bytes: int = 4096) -> Path:
    """Writes random bytes under a video file name (a corrupt file for tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8).tobytes())
    return path


def write_empty_video(path: str | Path) -> Path:
    """Writes a zero-byte file under a video file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_truncated_video(source: str | Path, path: str | Path, fraction: float = 0.5) -> Path:
    """Writes the first ``fraction`` of the bytes of the real video ``source`` (a truncated download).

    Without a faststart index the result cannot be opened; with one it opens and fails while decoding.
    """
    data = Path(source).read_bytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _periodic_lerp(values: np.ndarray, coords: np.ndarray, extent: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` of a periodic grid spanning ``extent`` pixels, at ``coords``."""
    grid = values.shape[axis]
    f = (coords * grid / extent) % grid
    i0 = np.floor(f).astype(np.int64)
    w = (f - i0).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    return np.take(values, i0 % grid, axis=axis) * (1 - w) + np.take(values, (i0 + 1) % grid, axis=axis) * w


def _sample_periodic(field: np.ndarray, y: np.ndarray, x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A periodic ``(gh, gw, 3)`` grid sampled bilinearly on the pixel rows ``y`` and columns ``x``."""
    return _periodic_lerp(_periodic_lerp(field, y, shape[0], axis=0), x, shape[1], axis=1)


@dataclass
class MotionClip:
    """A rendered clip and what the generator knows about it.

    ``frames``: uint8 ``(T, H, W, 3)``; ``camera``: float ``(T, 2)``, the scene's offset (y, x) in pixels
    at each frame (pixel p of frame t shows scene point p - camera[t], so frame t+1 is frame t moved by
    ``camera[t+1] - camera[t]``; zeros for a static camera); ``object_mask``: bool ``(T, H, W)``.
    """

    frames: np.ndarray
    camera: np.ndarray
    object_mask: np.ndarray


def make_motion_clip(
    motion: str,
    *,
    size: int | tuple[int, int],
    num_frames: int,
    rng: np.random.Generator,
    pan: bool = False,
) -> np.ndarray:
    """Renders one clip of ``motion`` as uint8 ``(T, H, W, 3)`` (``render_motion_clip``'s frames)."""
    return render_motion_clip(motion, size=size, num_frames=num_frames, rng=rng, pan=pan).frames


def render_motion_clip(
    motion: str,
    *,
    size: int | tuple[int, int],
    num_frames: int,
    rng: np.random.Generator,
    pan: bool = False,
    camera: np.ndarray | None = None,
) -> MotionClip:
    """Renders one clip of ``motion`` with its camera path and object mask; appearance drawn from ``rng``.

    Translations move the object 30-50% of the frame over the clip; approach/recede scale it by 1.5-1.9x.
    With ``pan`` the camera drifts 20-40% of the frame in a random direction, moving background and
    object together, over a background that is always textured (so the drift is visible).
    ``camera`` (T, 2), offsets (y, x) in pixels, films the same scene along another camera path instead
    of the drawn one (the rng draws are the same): e.g. every frame with frame 1's camera is the clip as
    a perfect stabiliser would show it, with no resampling error.
    """
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r}: expected one of {list(MOTIONS)}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 for a motion, got {num_frames}")
    height, width = (size, size) if isinstance(size, int) else size
    shape = (height, width)
    side = min(height, width)
    rows = np.arange(height, dtype=np.float32)
    cols = np.arange(width, dtype=np.float32)
    ys, xs = rows[:, None], cols[None, :]
    t_axis = np.arange(num_frames, dtype=np.float32)
    tau = rng.uniform(0, num_frames - 1)  # reference time at which size and position are drawn
    progress = (t_axis - tau) / (num_frames - 1)  # in [-1, 1]

    # Background: a plain colour with a little noise, or a periodic texture (coarse blobs + fine grain).
    textured = pan or rng.random() < 0.5
    coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
    if not textured:
        coarse[:] = coarse[0, 0]
    fine = rng.normal(0, 18 if textured else 6, (max(height // 2, 1), max(width // 2, 1), 3)).astype(
        np.float32
    )
    background_mean = coarse.reshape(-1, 3).mean(0)

    # Object: shape, aspect, two colours far enough from the background, texture.
    ellipse = rng.random() < 0.5
    aspect = rng.uniform(0.7, 1.4)
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    for _ in range(20):
        if np.abs(colours.mean(0) - background_mean).sum() > 90:
            break
        colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    texture = rng.choice(["plain", "stripes", "checker"])
    frequency = rng.uniform(1.5, 3.5)
    angle = rng.uniform(0, math.pi)

    # Size and centre at time tau, then their paths.
    # Log-size is uniform on [log 0.15, log 0.6) x side at every frame: an approaching object that reaches
    # the largest size restarts at the smallest (and a receding one the other way), as a translating
    # object leaving one edge re-enters at the opposite one.
    log_min, log_max = math.log(0.15 * side), math.log(0.6 * side)
    log_ref = rng.uniform(log_min, log_max)
    growth = {"approach": 1.0, "recede": -1.0}.get(motion, 0.0) * math.log(rng.uniform(1.5, 1.9))
    sizes = np.exp(log_min + (log_ref - log_min + growth * progress) % (log_max - log_min))
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    dy, dx = _DIRECTIONS.get(motion, (0.0, 0.0))
    distance = rng.uniform(0.3, 0.5) * side
    centres_y = cy + dy * distance * progress
    centres_x = cx + dx * distance * progress
    cam_y = np.zeros(num_frames)
    cam_x = np.zeros(num_frames)
    if pan:
        direction = rng.uniform(0, 2 * math.pi)
        drift = rng.uniform(0.2, 0.4) * side
        cam_y = math.sin(direction) * drift * progress
        cam_x = math.cos(direction) * drift * progress
    if camera is not None:
        camera = np.asarray(camera, dtype=np.float64)
        if camera.shape != (num_frames, 2):
            raise ValueError(f"camera: expected ({num_frames}, 2) offsets (y, x), got {camera.shape}")
        cam_y, cam_x = camera[:, 0], camera[:, 1]

    clip = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    masks = np.empty((num_frames, height, width), dtype=bool)
    background = None
    for t in range(num_frames):
        if background is None or pan or camera is not None:
            by, bx = rows - cam_y[t], cols - cam_x[t]
            background = _sample_periodic(coarse, by, bx, shape) + _sample_periodic(fine, by, bx, shape)
        frame = background
        # Toroidal offsets from the object's centre, in units of its half extent.
        oy = (ys - centres_y[t] - cam_y[t] + height / 2) % height - height / 2
        ox = (xs - centres_x[t] - cam_x[t] + width / 2) % width - width / 2
        v = oy / (sizes[t] / 2)
        u = ox / (sizes[t] * aspect / 2)
        mask = (u * u + v * v <= 1) if ellipse else ((np.abs(u) <= 1) & (np.abs(v) <= 1))
        if texture == "stripes":
            pick = np.sin(math.pi * frequency * (u * math.cos(angle) + v * math.sin(angle))) > 0
        elif texture == "checker":
            pick = (np.floor(frequency * (u + 1)) + np.floor(frequency * (v + 1))) % 2 == 0
        else:
            pick = np.ones_like(mask)
        obj = np.where(pick[..., None], colours[0], colours[1])
        frame = np.where(mask[..., None], obj, frame)
        clip[t] = np.clip(frame, 0, 255).astype(np.uint8)
        masks[t] = mask
    camera = np.stack([np.broadcast_to(cam_y, (num_frames,)), np.broadcast_to(cam_x, (num_frames,))], 1)
    return MotionClip(clip, camera.astype(np.float64), masks)


def split_clip_rng(seed: int, split: str, motion: str, k: int) -> np.random.Generator:
    """The generator of clip k of ``motion`` in ``split``, as ``make_folder_dataset`` draws it."""
    return np.random.default_rng((seed, _SPLIT_NUMBERS[split], MOTIONS.index(motion), k))


def make_folder_dataset(
    root: str | Path,
    motions: Sequence[str],
    clips_per_class: Mapping[str, int],
    size: int | tuple[int, int],
    num_frames: int,
    seed: int,
    pan_fraction: float = 0.0,
    fps: int = 25,
) -> dict[str, Any]:
    """Writes ``ROOT/<split>/<motion>/<motion>_<k>.mp4`` for the ``folder`` reader; deterministic per seed.

    Clip k of a class and split is drawn from ``default_rng((seed, split, class, k))`` and written with
    ``crf=0``: at crf 18, libx264 encoded the same frames differently now and then within one process on
    our 2-core VM (up to 135 of 200 tries; other pixels after decoding, so two demo runs extracted other
    features for a few clips); at crf 0 every try gave the same bytes. The first
    ``round(pan_fraction * n)`` clips of each class and split have a panning camera. Files are written
    under a temporary name and renamed; ``ROOT/manifest.json`` (each clip's motion, whether it pans and
    its camera offset (y, x) in pixels per frame, ``MotionClip.camera``) comes last.
    Returns a summary: classes (sorted, as the reader indexes them), clip and panning counts per split,
    seconds.
    """
    unknown = [m for m in motions if m not in MOTIONS]
    if unknown or not motions:
        raise ValueError(f"motions: expected a non-empty subset of {list(MOTIONS)}, got {list(motions)}")
    splits = {("val" if s == "validation" else s): n for s, n in clips_per_class.items()}
    bad = [s for s in splits if s not in _SPLIT_NUMBERS]
    if bad:
        raise ValueError(
            f"clips_per_class: unknown split {bad[0]!r}; expected keys from {list(_SPLIT_NUMBERS)}"
        )
    if not 0.0 <= pan_fraction <= 1.0:
        raise ValueError(f"pan_fraction must be in [0, 1], got {pan_fraction}")
    root = Path(root)
    started = time.perf_counter()
    jobs = [
        (split, c, k)
        for split, n in splits.items()
        for c, motion in enumerate(motions)
        for k in range(n)
    ]  # fmt: skip
    manifest = []
    panning = dict.fromkeys(splits, 0)
    for split, c, k in tqdm(jobs, desc=f"synthetic clips -> {root}", unit="clip", disable=len(jobs) < 50):
        motion = motions[c]
        pan = k < round(pan_fraction * splits[split])
        rng = split_clip_rng(seed, split, motion, k)
        clip = render_motion_clip(motion, size=size, num_frames=num_frames, rng=rng, pan=pan)
        rel = f"{split}/{motion}/{motion}_{k:04d}.mp4"
        with atomic_path(root / rel, durable=False) as tmp:  # regenerated on demand: no fsync
            write_video(tmp, clip.frames, fps=fps, crf=0)  # see the docstring
        camera = np.round(clip.camera, 3).tolist()
        manifest.append({"path": rel, "motion": motion, "pan": pan, "camera": camera})
        panning[split] += int(pan)
    summary = {
        "root": str(root),
        "classes": sorted(motions),
        "clips": {s: n * len(motions) for s, n in splits.items()},
        "panning": panning,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "manifest.json", json.dumps({**summary, "files": manifest}, indent=1))
    return summary

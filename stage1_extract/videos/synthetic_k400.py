"""Kinetics-like H.264 files for decoding benchmarks and tests: the encoding, not the content, matters.

Kinetics-400 clips are ~10 s of YouTube video at ~30 fps, scaled to a short side of 256 (340x256 for
4:3) and encoded with x264's defaults: B-frames with b-pyramid, a few keyframes per clip. Decoding cost
depends on exactly these (frames to decode before a sampled one, which frames are references), so the
generated files use them; the pictures are ``make_motion_clip``'s textured scenes with a panning camera.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from foundation.atomic import atomic_path
from stage1_extract.videos.synthetic import make_motion_clip


def write_k400_like_video(
    path: str | Path,
    seed: int = 0,
    *,
    size: tuple[int, int] = (256, 340),
    seconds: float = 10.0,
    fps: int = 30,
    gop: int = 300,
    crf: int = 23,
    preset: str = "medium",
) -> Path:
    """Writes an H.264 mp4 of ``seconds * fps`` frames at ``size`` (h, w), a keyframe every ``gop`` frames.

    x264 ``preset`` (default ``medium``: 3 B-frames, b-pyramid, 3 references, as Kinetics' ffmpeg
    defaults), no scene-cut keyframes, constant quality ``crf``. Deterministic per ``seed``.
    """
    if "libx264" not in av.codecs_available:
        raise RuntimeError("write_k400_like_video needs PyAV with libx264")
    height, width = size
    num_frames = round(seconds * fps)
    rng = np.random.default_rng(seed)
    motion = ("left", "right", "up", "down")[seed % 4]
    frames = make_motion_clip(motion, size=size, num_frames=num_frames, rng=rng, pan=True)
    path = Path(path)
    with atomic_path(path, durable=False) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
        }
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path

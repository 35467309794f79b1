"""Exact frame decoding at the least decoding work: one planned pass over the packets a clip's views need.

Decord (``video.read_frames``) fetches frames by seeking: every frame from the keyframe before a
requested one up to it is decoded, the requested ones are converted. ``PlannedReader`` decodes the same
frames with PyAV, bit for bit (the same FFmpeg ``scale=W:H:flags=bilinear,format=rgb24`` conversion
decord applies; checked by tests against decord), doing less:

- the packets are demuxed once, in decode order; frame ``i`` is the packet with the ``i``-th smallest
  timestamp (decord's numbering), so the plan knows which packets and keyframe groups (GOPs) hold the
  requested frames of *all* views of a clip before decoding anything;
- GOPs holding no requested frame are never decoded (one flush, then the next needed keyframe);
- inside a needed GOP, packets of frames not requested are decoded with ``skip_frame=NONREF``: the
  decoder drops them when no other frame references them (H.264 B-frames without b-pyramid references,
  about half of a default x264 stream), which cannot change any other frame;
- decoding stops once the last requested frame has come out; each requested frame is converted and
  resized once.

A file the plan cannot map exactly (frames without timestamps, duplicated timestamps, a rotation) raises
``Unplannable``, and the caller uses decord as before. ``hwaccel="cuda"`` decodes on NVDEC through
FFmpeg (PyAV's ``HWAccel``); frames come back to host memory for the same conversion.
"""

from __future__ import annotations

import bisect
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.filter import Graph

from stage1_extract.videos.bucket import VideoBytes, video_input


class Unplannable(Exception):
    """The file's timestamps do not let the planned reader reproduce decord's frames; use decord."""


def open_container(path: str | Path | VideoBytes, hwaccel: str | None = None) -> av.container.InputContainer:
    """Opens ``path`` (a file, or a video's bytes) with PyAV, decoding on ``hwaccel`` (e.g. ``"cuda"``:
    NVDEC) when given."""
    if hwaccel is None:
        return av.open(video_input(path), metadata_errors="ignore")
    from av.codec.hwaccel import HWAccel

    # CUDA: FFmpeg retains the device's primary context instead of creating a context per file
    options = {"primary_ctx": "1"} if hwaccel == "cuda" else None
    accel = HWAccel(device_type=hwaccel, allow_software_fallback=False, options=options)
    return av.open(video_input(path), hwaccel=accel, metadata_errors="ignore")


class PlannedReader:
    """Decord-numbered frames of one video, decoded in one planned pass (see the module docstring).

    ``threads``: FFmpeg decoder threads (1 when DataLoader workers already use every core).
    """

    def __init__(self, path: str | Path | VideoBytes, threads: int = 1, hwaccel: str | None = None) -> None:
        self.path = str(path)
        self.container = open_container(path, hwaccel)
        try:
            if not self.container.streams.video:
                raise ValueError(f"{path}: no video stream")
            self.stream = self.container.streams.video[0]
            self.stream.thread_count = max(1, threads)
            self.packets = [p for p in self.container.demux(self.stream) if p.size]  # no end-of-file flush
        except BaseException:
            self.container.close()
            raise
        if any(p.pts is None for p in self.packets):
            self.close()
            raise Unplannable(f"{path}: packets without timestamps")
        pts = np.array([p.pts for p in self.packets], dtype=np.int64)
        self.display_pts = np.sort(pts)  # frame i (decord's numbering) = i-th smallest timestamp
        if len(np.unique(pts)) != len(pts):
            self.close()
            raise Unplannable(f"{path}: packets share timestamps")
        self.position_of_pts = {int(p): i for i, p in enumerate(pts)}  # decode-order position
        self.keyframes = [i for i, p in enumerate(self.packets) if p.is_keyframe]
        if self.packets and (not self.keyframes or self.keyframes[0] != 0):
            self.close()
            raise Unplannable(f"{path}: the stream does not start with a keyframe")
        self.frames_decoded = 0  # decoder outputs of the last ``read`` (skipped frames not counted)
        self.packets_sent = 0

    def __len__(self) -> int:
        return len(self.packets)

    def __enter__(self) -> PlannedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def frame_size(self) -> tuple[int, int]:
        """(height, width) from the stream header."""
        ctx = self.stream.codec_context
        return int(ctx.height), int(ctx.width)

    def _gop(self, position: int) -> int:
        """Index into ``keyframes`` of the GOP holding decode-order ``position``."""
        return bisect.bisect_right(self.keyframes, position) - 1

    def needed_gops(self, frames: np.ndarray) -> list[int]:
        """The GOPs (indices into ``keyframes``) to decode for ``frames`` (decord frame numbers).

        A frame shown before its GOP's keyframe (an open-GOP leading picture) needs the previous GOP too.
        """
        gops: set[int] = set()
        for i in frames.tolist():
            pts = int(self.display_pts[i])
            g = self._gop(self.position_of_pts[pts])
            gops.add(g)
            if g > 0 and pts < self.packets[self.keyframes[g]].pts:
                gops.add(g - 1)
        return sorted(gops)

    def read(self, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Frames at ``indices`` (any shape, repeats allowed) as uint8 ``(*indices.shape, h, w, 3)``,
        resized to ``size`` (h, w) exactly as ``decord.VideoReader(width=w, height=h)`` returns them.
        """
        indices = np.asarray(indices)
        unique, inverse = np.unique(indices, return_inverse=True)
        if len(unique) and (unique[0] < 0 or unique[-1] >= len(self)):
            raise IndexError(f"{self.path}: frames {unique[0]}..{unique[-1]} outside 0..{len(self) - 1}")
        wanted = {int(self.display_pts[i]): int(i) for i in unique.tolist()}
        found: dict[int, np.ndarray] = {}
        converter = _Converter(size, self.stream.time_base)
        ctx = self.stream.codec_context
        if self.packets_sent:  # an earlier read left the decoder mid-stream
            ctx.flush_buffers()
        self.frames_decoded = self.packets_sent = 0

        def collect(frames: list[av.VideoFrame]) -> None:
            for frame in frames:
                self.frames_decoded += 1
                if frame.pts is None:
                    raise Unplannable(f"{self.path}: a decoded frame has no timestamp")
                if getattr(frame, "rotation", 0):
                    raise Unplannable(f"{self.path}: rotated video")
                i = wanted.get(int(frame.pts))
                if i is not None and i not in found:
                    found[i] = converter(frame)

        end_of_last = None
        for g in self.needed_gops(unique):
            if len(found) == len(wanted):
                break
            start = self.keyframes[g]
            stop = self.keyframes[g + 1] if g + 1 < len(self.keyframes) else len(self.packets)
            if end_of_last is not None and start != end_of_last:  # jump over GOPs: drain, then reset
                ctx.skip_frame = "DEFAULT"
                collect(ctx.decode(None))
                ctx.flush_buffers()
            for packet in self.packets[start:stop]:
                ctx.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                self.packets_sent += 1
                collect(ctx.decode(packet))
                if len(found) == len(wanted):
                    break
            end_of_last = stop
        if len(found) < len(wanted):
            ctx.skip_frame = "DEFAULT"
            collect(ctx.decode(None))
        if len(found) != len(wanted):
            raise ValueError(
                f"{self.path}: decoded {len(found)} of {len(wanted)} requested frames (file truncated?)"
            )
        frames = np.stack([found[i] for i in unique.tolist()])
        return frames[inverse.reshape(-1)].reshape(*indices.shape, *frames.shape[1:])


def decord_may_miscopy(width: int) -> bool:
    """Whether decord may return RGB frames ``width`` wide with a wrong channel count.

    Decord reads a frame's channels as ``linesize / width``, wrong when FFmpeg pads an RGB row to a
    multiple of ``width`` (e.g. 48 or 72 px); ``video.read_frames_pyav`` decodes those instead, so the
    plan leaves them to it. Tried for every alignment FFmpeg's frame pools use (16, 32, 64 bytes).
    """
    for align in (16, 32, 64):
        step = 1
        while True:
            linesize = 3 * (-(-width // step) * step)
            if linesize % align == 0 or step >= align:
                break
            step *= 2
        if linesize % width == 0 and linesize != 3 * width:
            return True
    return False


class _Converter:
    """Decoded frame -> uint8 RGB ``(h, w, 3)`` through decord's filter: ``scale=w:h:flags=bilinear``."""

    def __init__(self, size: tuple[int, int], time_base: Fraction | None) -> None:
        self.size, self.time_base = size, time_base
        self.graph: Graph | None = None
        self.key: tuple | None = None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        key = (frame.width, frame.height, frame.format.name)
        if self.graph is None or key != self.key:
            graph = Graph()
            src = graph.add_buffer(
                width=frame.width,
                height=frame.height,
                format=frame.format,
                time_base=frame.time_base or self.time_base,
            )
            h, w = self.size
            scale = graph.add("scale", f"{w}:{h}:flags=bilinear")
            rgb = graph.add("format", "rgb24")
            sink = graph.add("buffersink")
            src.link_to(scale)
            scale.link_to(rgb)
            rgb.link_to(sink)
            graph.configure()
            self.graph, self.key = graph, key
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()


_CUDA_DECODE: dict[str, str | None] = {}  # per process: None = usable, else why not


def cuda_decode_problem(sample: str | Path) -> str | None:
    """Why NVDEC decoding through PyAV does not work here (None when it does), tried on ``sample``."""
    key = str(sample)
    if key not in _CUDA_DECODE:
        try:
            from av.codec.hwaccel import hwdevices_available

            if "cuda" not in hwdevices_available():
                raise RuntimeError("this PyAV build has no CUDA hardware device")
            with open_container(sample, "cuda") as container:
                next(container.decode(video=0))
            _CUDA_DECODE[key] = None
        except Exception as e:  # any failure means: decode on the CPU
            _CUDA_DECODE[key] = f"{type(e).__name__}: {e}".strip()
    return _CUDA_DECODE[key]


def resolve_decode_device(requested: str, sample: str | Path | None) -> str:
    """``"cuda"`` when asked for and NVDEC decodes ``sample`` here, else ``"cpu"`` (with a warning)."""
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"--decode-device: expected cpu or cuda, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    problem = "no video to try it on" if sample is None else cuda_decode_problem(sample)
    if problem is None:
        return "cuda"
    warnings.warn(f"--decode-device cuda: NVDEC decoding is not available ({problem}); decoding on the CPU",
                  RuntimeWarning, stacklevel=2)  # fmt: skip
    return "cpu"

"""Decoding clips with decord into uint8 view tensors, and the torch Dataset that feeds extraction.

Frames are fetched by index (``VideoReader.get_batch``) and resized during decoding (decord's
``width``/``height``) so that the short side equals the crop size; the frame size is read first from the
container header with PyAV, which decodes nothing. Then the centre crop or three crops along the long side
are cut (views ordered as in ``stage1_extract.videos.sampling``). A few tiny frame widths that decord copies
wrongly are decoded with PyAV instead. ``decode_plan`` returns the same frames with less decoding (one
planned PyAV pass for all views of a clip) and is tried first; decord stays the general path. A video
that cannot be read becomes an error item naming the file, not an exception, so one bad file never stops
an extraction.

Videos are decoded as displayed: a rotation in the container's display matrix (phone videos filmed
upright) is read from the first frame's side data with PyAV; decord (CPU) applies it when given the
displayed size, and the PyAV fallback rotates its frames with ``apply_rotation`` (the planned pass leaves
rotated videos to decord). Container metadata in any encoding is read without failing (PyAV's
``metadata_errors="ignore"``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import decord
import numpy as np
import torch
from torch.utils.data import Dataset

from stage1_extract.videos.bucket import VideoBytes, clip_name, clip_source, video_input
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import DEFAULT_MAX_VIDEO_MB, ClipRecord
from stage1_extract.videos.decode_plan import PlannedReader, Unplannable, decord_may_miscopy
from stage1_extract.videos.sampling import clip_indices
from store.objects import is_url
from store.schema import StoreError

# decord.DECORDError is not a RuntimeError subclass; PyAV's errors are OSError/ValueError subclasses or
# av.FFmpegError.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    decord.DECORDError,
    OSError,
    ValueError,
    EOFError,
    av.FFmpegError,
)


def open_container(path: str | Path | VideoBytes) -> av.container.InputContainer:
    """PyAV input container whose metadata may be in any encoding (undecodable bytes are dropped)."""
    return av.open(video_input(path), metadata_errors="ignore")


def probe_video(path: str | Path | VideoBytes) -> tuple[int, int, int]:
    """(height, width, rotation) of the first video stream as displayed.

    The size comes from the header; the rotation (counter-clockwise degrees, 0, 90, 180 or 270, as
    PyAV's ``VideoFrame.rotation``; other angles count as 0, as in decord) from the display matrix that
    the decoder attaches to the first frame, decoded only for containers that can carry one (MP4/MOV
    and Matroska; AVI, MPEG and FLV cannot). Height and width are swapped for 90 and 270.
    """
    with open_container(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_count = 1
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
        if height <= 0 or width <= 0:
            raise ValueError(f"{path}: the header gives no frame size ({width}x{height})")
        rotation = 0
        if any(name in ("mov", "matroska") for name in container.format.name.split(",")):
            frame = next(container.decode(stream), None)
            if frame is None:
                raise ValueError(f"{path}: the video has no frames")
            rotation = round(frame.rotation) % 360
    rotation = rotation if rotation in (90, 180, 270) else 0
    return (width, height, rotation) if rotation in (90, 270) else (height, width, rotation)


def probe_frame_size(path: str | Path | VideoBytes) -> tuple[int, int]:
    """(height, width) of the first video stream as displayed (see ``probe_video``)."""
    return probe_video(path)[:2]


def apply_rotation(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Frames ``(..., H, W, C)`` as stored -> as displayed, for a counter-clockwise ``rotation``."""
    return np.rot90(frames, k=(rotation // 90) % 4, axes=(-3, -2)) if rotation else frames


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to ``short_side``, keeping the aspect ratio."""
    if height <= width:
        return short_side, max(short_side, round(width * short_side / height))
    return max(short_side, round(height * short_side / width)), short_side


def crop_offsets(
    height: int,
    width: int,
    crop_size: int,
    num_crops: int,
    rng: np.random.Generator | None = None,
) -> list[tuple[int, int]]:
    """(top, left) of square crops: a random one with ``rng``, else the centre (1) or start/centre/end (3).

    Three crops move along the long side and are centred on the short side.
    """
    if crop_size > height or crop_size > width:
        raise ValueError(f"crop {crop_size} does not fit a {height}x{width} frame")
    dy, dx = height - crop_size, width - crop_size
    if rng is not None:
        return [(int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1)))]
    if num_crops == 1:
        return [(dy // 2, dx // 2)]
    if num_crops == 3:
        if dy > dx:
            return [(0, dx // 2), (dy // 2, dx // 2), (dy, dx // 2)]
        return [(dy // 2, 0), (dy // 2, dx // 2), (dy // 2, dx)]
    raise ValueError(f"num_crops: expected 1 or 3, got {num_crops}")


def open_video(path: str | Path | VideoBytes, size: tuple[int, int] | None = None) -> decord.VideoReader:
    """A single-threaded decord reader (DataLoader workers parallelise), resizing to ``size`` (h, w)."""
    height, width = size if size is not None else (-1, -1)
    return decord.VideoReader(video_input(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)


def read_frames(reader: decord.VideoReader, indices: np.ndarray) -> np.ndarray:
    """Frames at ``indices`` (any shape, repeats allowed) as uint8 ``(*indices.shape, H, W, 3)``.

    Each distinct frame is decoded once, in increasing order.
    """
    unique, inverse = np.unique(np.asarray(indices), return_inverse=True)
    frames = reader.get_batch(unique.tolist()).asnumpy()
    if frames.ndim != 4 or frames.shape[0] != len(unique):
        raise ValueError(f"decoder returned {frames.shape} for {len(unique)} frames")
    return frames[inverse.reshape(-1)].reshape(*np.shape(indices), *frames.shape[1:])


def read_frames_pyav(
    path: str | Path | VideoBytes, indices: np.ndarray, size: tuple[int, int], rotation: int = 0
) -> np.ndarray:
    """Like ``read_frames`` but decoding sequentially with PyAV, resizing to ``size`` (h, w, as displayed)
    and applying the display ``rotation`` (counter-clockwise degrees, from ``probe_video``).

    The fallback for frame widths decord copies wrongly (e.g. 48 or 72 px: it mistakes the padded rows
    for a 4-channel image and fails); only tiny frames hit it, so decoding from the start is cheap.
    """
    unique, inverse = np.unique(np.asarray(indices), return_inverse=True)
    wanted, last = set(unique.tolist()), int(unique[-1])
    found: dict[int, np.ndarray] = {}
    stored = (size[1], size[0]) if rotation in (90, 270) else size
    with open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                found[i] = frame.to_ndarray(format="rgb24", width=stored[1], height=stored[0])
            if i >= last:
                break
    if len(found) != len(unique):
        raise ValueError(f"{path}: decoded {len(found)} of {len(unique)} requested frames (file truncated?)")
    frames = apply_rotation(np.stack([found[i] for i in unique.tolist()]), rotation)
    return frames[inverse.reshape(-1)].reshape(*np.shape(indices), *frames.shape[1:])


def decode_views(
    path: str | Path | VideoBytes,
    geometry: ClipGeometry,
    *,
    train: bool = False,
    rng: np.random.Generator | None = None,
    start_frame: int | None = None,
    end_frame: int | None = None,
    threads: int = 1,
    hwaccel: str | None = None,
) -> torch.Tensor:
    """Decodes one video into its views, uint8 ``(V, T, 3, crop, crop)`` (V = clips x crops, clip-major).

    Training: one random clip and (with ``geometry.train_crop == "random"``) one random crop, from ``rng``.
    Frames come from one planned PyAV pass (``decode_plan``: the same frames as decord, less decoding;
    ``threads`` decoder threads, ``hwaccel="cuda"`` for NVDEC), else from decord as before.
    Raises one of ``DECODE_ERRORS`` for a missing, empty, corrupt or truncated file. ``path`` may be a
    video's bytes fetched from object storage (``bucket.VideoBytes``).
    """
    if not isinstance(path, VideoBytes) and not Path(path).is_file():
        what = "dangling symbolic link" if Path(path).is_symlink() else "no such file"
        raise FileNotFoundError(f"{path}: {what}")

    def index_for(n: int, generator: np.random.Generator | None) -> np.ndarray:
        segment = {"start_frame": start_frame, "end_frame": end_frame, "source": str(path)}
        return clip_indices(n, geometry, train=train, rng=generator, **segment)

    crop_size = geometry.crop_size
    fallback_rng = copy.deepcopy(rng)  # decord must draw what it would have drawn without the plan
    try:
        frames = planned_frames(path, crop_size, lambda n: index_for(n, rng), threads, hwaccel)
    except (Unplannable, *DECODE_ERRORS):
        rng = fallback_rng
        frames = decord_frames(path, crop_size, lambda n: index_for(n, rng))
    h, w = frames.shape[2:4]
    crop_rng = rng if train and geometry.train_crop == "random" else None
    offsets = crop_offsets(h, w, crop_size, 1 if train else geometry.num_crops, crop_rng)
    views = [clip[:, y : y + crop_size, x : x + crop_size] for clip in frames for (y, x) in offsets]
    return torch.from_numpy(np.ascontiguousarray(np.stack(views))).permute(0, 1, 4, 2, 3).contiguous()


def planned_frames(
    path: str | Path | VideoBytes,
    crop_size: int,
    index_for: Callable[[int], np.ndarray],
    threads: int = 1,
    hwaccel: str | None = None,
) -> np.ndarray:
    """Frames ``(clips, T, h, w, 3)`` at ``index_for(num_frames)``, short side resized to ``crop_size``,
    from one planned PyAV pass; ``Unplannable`` where decord's frames cannot be reproduced exactly."""
    with PlannedReader(path, threads=threads, hwaccel=hwaccel) as reader:
        height, width = reader.frame_size()
        if height <= 0 or width <= 0 or len(reader) == 0:
            raise Unplannable(f"{path}: no frame size or no frames in the header")
        size = resized_shape(height, width, crop_size)
        if decord_may_miscopy(size[1]):
            raise Unplannable(f"{path}: width {size[1]}: the frames come from read_frames_pyav")
        return reader.read(index_for(len(reader)), size)


def decord_frames(
    path: str | Path | VideoBytes, crop_size: int, index_for: Callable[[int], np.ndarray]
) -> np.ndarray:
    """Frames ``(clips, T, h, w, 3)`` at ``index_for(num_frames)`` through decord's seeking reader."""
    height, width, rotation = probe_video(path)
    size = resized_shape(height, width, crop_size)
    reader = open_video(path, size)  # decord (CPU) applies the rotation; sizes are as displayed
    n = len(reader)
    if n == 0:
        raise ValueError(f"{path}: the video has no frames")
    idx = index_for(n)
    try:
        frames = read_frames(reader, idx)  # (clips, T, h, w, 3)
    except decord.DECORDError as e:
        if "must exactly match" not in str(e):
            raise
        frames = read_frames_pyav(path, idx, size, rotation)
    if frames.shape[-1] != 3:
        frames = read_frames_pyav(path, idx, size, rotation)
    return frames


class VideoClipDataset(Dataset):
    """Clips of a ``DatasetIndex`` as view tensors, for a DataLoader with worker processes.

    Item: ``{"video": uint8 (V, T, 3, H, W) or None, "label", "index", "path", "error": None or
    (error type name, message)}``. Training randomness comes from ``numpy.random.default_rng((seed, epoch,
    index))``: it depends only on those three numbers, never on a worker's RNG state, so results do not
    change with the number of workers. Call ``set_epoch`` before each epoch (DataLoader workers are
    re-created per epoch unless ``persistent_workers=True``, which would keep the old epoch).
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        root: str | Path | None,
        geometry: ClipGeometry,
        train: bool = False,
        seed: int = 0,
        decode_threads: int = 1,
        decode_device: str = "cpu",
        max_video_mb: float = DEFAULT_MAX_VIDEO_MB,
    ) -> None:
        self.records = list(records)
        # None: paths as given (e.g. on the command line); an s3:// URL: videos fetched from the bucket
        self.root = None if root is None else root if is_url(root) else Path(root)
        self.max_video_bytes = int(max_video_mb * 2**20)
        self.geometry = geometry
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.decode_threads = decode_threads
        self.hwaccel = "cuda" if decode_device == "cuda" else None  # resolve_decode_device checked it

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose random clips and crops training items use."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        item: dict[str, Any] = {"video": None, "label": record.label, "index": index, "path": record.path}
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.train else None
        path = record.path if self.root is None else clip_name(self.root, record.path)
        try:
            # paths from annotation files: refused when they leave the root; fetched from a bucket root
            source = (
                Path(path) if self.root is None else clip_source(self.root, record.path, self.max_video_bytes)
            )
            item["video"] = decode_views(
                source,
                self.geometry,
                train=self.train,
                rng=rng,
                start_frame=record.start_frame,
                end_frame=record.end_frame,
                threads=self.decode_threads,
                hwaccel=self.hwaccel,
            )
            item["error"] = None
        except StoreError:  # the bucket itself failed (endpoint, credentials): stop, a resume redoes the clip
            raise
        except DECODE_ERRORS as e:
            item["error"] = clip_error(e, path)
        return item


def clip_error(e: BaseException, path: str) -> tuple[str, str]:
    """A failed clip's recorded (type, message); every message names the file (decord's and PyAV's may
    not)."""
    message = str(e) or repr(e)
    return type(e).__name__, message if path in message else f"{path}: {message}"


def collate_clips(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the decoded items of a batch; failed ones pass through separately under ``"failed"``.

    Returns ``video`` uint8 ``(B, V, T, 3, H, W)`` (None when every item failed), ``label`` and ``index``
    int64 ``(B,)``, ``path`` (list), and ``failed``: the error items (``index``, ``label``, ``path``,
    ``error``).
    """
    good = [b for b in batch if b["error"] is None]
    failed = [{k: b[k] for k in ("index", "label", "path", "error")} for b in batch if b["error"] is not None]
    return {
        "video": torch.stack([b["video"] for b in good]) if good else None,
        "label": torch.tensor([b["label"] for b in good], dtype=torch.long),
        "index": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "path": [b["path"] for b in good],
        "failed": failed,
    }

"""Videos as users have them, written with PyAV: a rotation in the display matrix (phone videos), container
metadata that is not UTF-8, a file with no video stream; and failure messages that name the file."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

import stage1_extract  # noqa: F401  (first: fixes the torchvision import before anything imports timm)
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import ClipRecord, DatasetConfig
from stage1_extract.videos.sampling import clip_indices
from stage1_extract.videos.synthetic import (
    video_codec,
    write_corrupt_video,
    write_empty_video,
    write_truncated_video,
    write_video,
)
from stage1_extract.videos.video import VideoClipDataset, decode_views, probe_video, read_frames_pyav


def _write(path: Path, frames: np.ndarray, rotation: int = 0, latin1_title: str | None = None) -> Path:
    """An mp4 whose display matrix rotates by ``rotation`` degrees counter-clockwise (PyAV's convention,
    the same as ``VideoFrame.rotation``) and whose title is written in Latin-1 when given."""
    encoding = "latin-1" if latin1_title is not None else "utf-8"
    with av.open(str(path), "w", format="mp4", metadata_encoding=encoding) as container:
        if latin1_title is not None:
            container.metadata["title"] = latin1_title
        stream = container.add_stream(video_codec(), rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "10", "preset": "veryfast"} if video_codec() == "libx264" else {}
        if rotation:
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _gradient_frames(height: int, width: int, num_frames: int = 8) -> np.ndarray:
    """Smooth frames whose orientation is visible: red grows down the rows, green along the columns."""
    rows = np.linspace(0, 255, height)[:, None] * np.ones((1, width))
    cols = np.ones((height, 1)) * np.linspace(0, 255, width)[None, :]
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0], frames[..., 1] = rows.astype(np.uint8), cols.astype(np.uint8)
    frames[..., 2] = (np.arange(num_frames) * 25)[:, None, None]
    return frames


def _centre(frames: np.ndarray, crop: int) -> np.ndarray:
    h, w = frames.shape[-3:-1]
    y, x = (h - crop) // 2, (w - crop) // 2
    return frames[..., y : y + crop, x : x + crop, :]


# (stored height, width, crop): 64x96 decodes with decord; 48x64 shown at width 48 takes the PyAV fallback
@pytest.mark.parametrize("shape", [(64, 96, 64), (48, 64, 48)])
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_videos_come_out_upright(tmp_path, rotation, shape):
    height, width, crop = shape
    frames = _gradient_frames(height, width)
    path = _write(tmp_path / "phone.mp4", frames, rotation=rotation)
    shown = np.rot90(frames, k=rotation // 90, axes=(1, 2))  # what a player displays
    assert probe_video(path) == (*shown.shape[1:3], rotation)
    cfg = DatasetConfig(num_frames=4)
    idx = clip_indices(len(frames), cfg, train=False)[0]
    views = (
        decode_views(path, ClipGeometry.of_dataset(cfg, crop)).permute(0, 1, 3, 4, 2).numpy()[0]
    )  # (T, crop, crop, 3)
    h, w = shown.shape[1:3]
    scale = crop / min(h, w)
    assert scale == 1  # the short side is the crop: no resizing, the centre crop of the shown frames
    expected = _centre(shown[idx], crop).astype(float)
    assert np.abs(views - expected).mean() < 3
    unrotated = _centre(frames[idx], crop).astype(float)
    if unrotated.shape == expected.shape:
        assert np.abs(views - unrotated).mean() > 30  # the orientation is visible in the data


def test_pyav_fallback_rotates_and_resizes(tmp_path):
    frames = _gradient_frames(64, 96)
    path = _write(tmp_path / "phone.mp4", frames, rotation=90)
    got = read_frames_pyav(path, np.array([[1, 5]]), (48, 32), rotation=90)  # shown 96x64 halved
    shown = np.rot90(frames[[1, 5]], k=1, axes=(1, 2)).astype(float)
    pooled = shown.reshape(2, 48, 2, 32, 2, 3).mean(axis=(2, 4))
    assert got.shape == (1, 2, 48, 32, 3)
    assert np.abs(got[0] - pooled).mean() < 4


def test_latin1_metadata_decodes_like_a_clean_file(tmp_path):
    frames = _gradient_frames(32, 32)
    odd = _write(tmp_path / "odd.mp4", frames, latin1_title="Caf\xe9 cr\xe8me")
    clean = _write(tmp_path / "clean.mp4", frames)
    with pytest.raises(UnicodeDecodeError):  # the file really is what HMDB51 has: PyAV's default refuses
        av.open(str(odd)).close()
    cfg = DatasetConfig(num_frames=4)
    assert (
        decode_views(odd, ClipGeometry.of_dataset(cfg, 32))
        == decode_views(clean, ClipGeometry.of_dataset(cfg, 32))
    ).all()


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _bad_files(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (expected error type, text the message must hold besides the path)."""
    write_video(root / "good.mp4", _gradient_frames(32, 32))
    write_corrupt_video(root / "corrupt.mp4")
    write_empty_video(root / "empty.mp4")
    source = write_video(root.parent / "source.mp4", _gradient_frames(32, 32, 40), faststart=True)
    write_truncated_video(source, root / "truncated.mp4")  # opens; fails while decoding (decord's error)
    _audio_only(root / "audio.mp4")
    (root / "dangling.mp4").symlink_to(root / "gone.mp4")
    return {
        "audio.mp4": ("ValueError", "no video stream"),
        "dangling.mp4": ("FileNotFoundError", "dangling symbolic link"),
        "absent.mp4": ("FileNotFoundError", "no such file"),
    }


def test_every_failure_names_the_file(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    (tmp_path / "outside.mp4").write_bytes(b"")
    specific = _bad_files(root)
    names = ["good.mp4", "corrupt.mp4", "empty.mp4", "truncated.mp4", *specific]
    records = [ClipRecord(n, 0) for n in [*names, "../outside.mp4", "/etc/passwd"]]
    dataset = VideoClipDataset(records, root, ClipGeometry(num_frames=4, crop_size=32))
    items = {r.path: dataset[i] for i, r in enumerate(records)}
    assert items.pop("good.mp4")["error"] is None
    for name, item in items.items():
        kind, message = item["error"]
        assert str(root / name) in message or name in message, (name, message)
        if name in specific:
            assert (kind, specific[name][1] in message) == (specific[name][0], True), (name, kind, message)
    assert items["../outside.mp4"]["error"][0] == "PathOutsideRoot"
    assert items["/etc/passwd"]["error"][0] == "PathOutsideRoot"

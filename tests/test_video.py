"""Frame sampling (hand-computed indices), crops, decoding round trips, and bad files as error items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import stage1_extract  # noqa: F401  (first: fixes the torchvision import before anything imports timm)
from stage1_extract.videos.bucket import VideoBytes
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import ClipRecord, DatasetConfig
from stage1_extract.videos.sampling import clip_indices, dense_indices, num_views, uniform_indices, view_index
from stage1_extract.videos.synthetic import (
    write_corrupt_video,
    write_empty_video,
    write_truncated_video,
    write_video,
)
from stage1_extract.videos.video import (
    VideoClipDataset,
    collate_clips,
    crop_offsets,
    decode_views,
    decord_frames,
    read_frames_pyav,
    resized_shape,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- sampling


def test_uniform_test_indices_are_segment_middles():
    assert uniform_indices(80, 8).tolist() == [[5, 15, 25, 35, 45, 55, 65, 75]]
    # segments [0,2) [2,5) [5,7) [7,10): middles 0+1, 2+1, 5+1, 7+1
    assert uniform_indices(10, 4).tolist() == [[1, 3, 6, 8]]
    # two clips take the 1/4 and 3/4 points of each 20-frame segment
    assert uniform_indices(80, 4, num_clips=2).tolist() == [[5, 25, 45, 65], [15, 35, 55, 75]]
    # shorter than T: frames repeat, in order, never past the end
    assert uniform_indices(3, 8).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]


def test_uniform_train_indices_one_per_segment():
    draws = np.concatenate([uniform_indices(80, 8, rng=np.random.default_rng(s)) for s in range(50)])
    segment = draws // 10
    assert (segment == np.arange(8)).all()  # each pick inside its own segment
    assert len(np.unique(draws[:, 0])) > 5  # and spread over it
    a = uniform_indices(80, 8, rng=np.random.default_rng(3))
    assert (a == uniform_indices(80, 8, rng=np.random.default_rng(3))).all()


def test_dense_indices():
    # span (8-1)*16+1 = 113, valid starts 250-113+1 = 138: centres of 3 parts floor(138*{1,3,5}/6)
    test = dense_indices(250, 8, 16, num_clips=3)
    assert test[:, 0].tolist() == [23, 69, 115]
    assert (np.diff(test, axis=1) == 16).all()
    assert dense_indices(50, 8, 16).tolist() == [[0, 16, 32, 48, 49, 49, 49, 49]]  # clamped to the last frame
    starts = [dense_indices(250, 8, 16, rng=np.random.default_rng(s))[0, 0] for s in range(200)]
    assert min(starts) >= 0 and max(starts) <= 137 and len(set(starts)) > 50


def test_clip_indices_follow_config_and_segment():
    cfg = DatasetConfig(num_frames=4, num_clips=2, num_crops=3)
    assert clip_indices(100, cfg, train=False, start_frame=10, end_frame=30).tolist() == [
        [11, 16, 21, 26],
        [13, 18, 23, 28],
    ]  # 20-frame segment from 10: 4 segments of 5, points 1/4 and 3/4
    assert clip_indices(100, cfg, train=True, rng=np.random.default_rng(0)).shape == (1, 4)
    assert clip_indices(20, cfg, train=False, end_frame=500).max() < 20  # segment clamped to the video
    with pytest.raises(ValueError, match="rng"):
        clip_indices(100, cfg, train=True)
    assert num_views(cfg, train=False) == 6 and num_views(cfg, train=True) == 1
    assert [view_index(c, k, 3) for c in range(2) for k in range(3)] == list(range(6))


def test_resize_and_crops():
    assert resized_shape(480, 640, 224) == (224, 299)  # 640 * 224 / 480 = 298.67
    assert resized_shape(640, 360, 112) == (199, 112)
    assert crop_offsets(32, 48, 32, 1) == [(0, 8)]
    assert crop_offsets(32, 48, 32, 3) == [(0, 0), (0, 8), (0, 16)]  # along the long side
    assert crop_offsets(48, 32, 32, 3) == [(0, 0), (8, 0), (16, 0)]
    top, left = crop_offsets(32, 48, 32, 3, rng=np.random.default_rng(0))[0]
    assert top == 0 and 0 <= left <= 16


# ---------------------------------------------------------------------------------------------- decoding


def _coded_clip(num_frames: int = 16, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame t has green = 255 - 15 t everywhere; red grows with x (0 at the left, ~250 at the right)."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 0] = (np.arange(width) * 250 // (width - 1))[None, None, :]
    frames[..., 1] = (255 - 15 * np.arange(num_frames))[:, None, None]
    frames[..., 2] = 90
    return frames


@pytest.fixture(scope="module")
def coded_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("coded") / "coded.mp4", _coded_clip())


def test_decode_round_trip_frames_crops_and_order(coded_video):
    cfg = DatasetConfig(num_frames=4, num_clips=2, num_crops=3)
    views = decode_views(coded_video, ClipGeometry.of_dataset(cfg, 32))
    assert views.dtype == torch.uint8 and views.shape == (6, 4, 3, 32, 32)  # (clips*crops, T, 3, H, W)
    # 48x64 -> short side 32 -> 32x43; clips sample frames [1,5,9,13] and [3,7,11,15] (see sampling tests)
    for clip, frames in enumerate(([1, 5, 9, 13], [3, 7, 11, 15])):
        green = views[clip * 3 : clip * 3 + 3, :, 1].float().mean(dim=(0, 2, 3))
        assert torch.allclose(green, torch.tensor([255.0 - 15 * f for f in frames]), atol=4)
    red = views[:3, :, 0].float().mean(dim=(1, 2, 3))  # crops start/centre/end at x = 0, 5, 11 of 43
    # resized column j samples source x = (j + 0.5) * 64 / 43 - 0.5; a crop averages j = x0 .. x0 + 31
    expected = torch.tensor([((x0 + 16) * 64 / 43 - 0.5) * 250 / 63 for x0 in (0, 5, 11)])
    assert torch.allclose(red, expected, atol=6)
    assert (views[:, :, 2].float() - 90).abs().mean() < 4


def test_widths_decord_copies_wrongly_fall_back_to_pyav(tmp_path):
    # decord returns a 48-px-wide frame as 4 channels and fails; the same frames must come back
    path = write_video(tmp_path / "portrait.mp4", _coded_clip(num_frames=8, height=64, width=48))
    views = decode_views(path, ClipGeometry(num_frames=4, num_crops=3, crop_size=48))
    assert views.shape == (3, 4, 3, 48, 48)  # 64x48 keeps its size; crops at y = 0, 8, 16
    green = views[:, :, 1].float().mean(dim=(0, 2, 3))
    assert torch.allclose(green, torch.tensor([255.0 - 15 * f for f in (1, 3, 5, 7)]), atol=4)
    red = views[0, :, 0].float().mean(dim=(0, 1))  # one crop, averaged over frames and rows: red grows with x
    assert torch.allclose(red, torch.arange(48.0) * 250 // 47, atol=8)


def test_a_video_decodes_the_same_from_its_bytes(coded_video, tmp_path):
    """A video fetched from object storage is decoded from memory: the planned PyAV pass, decord's seeking
    reader and the PyAV fallback give the frames they give from the file."""
    portrait = write_video(tmp_path / "portrait.mp4", _coded_clip(num_frames=8, height=64, width=48))
    geometry = ClipGeometry(num_frames=4, num_clips=2, num_crops=3, crop_size=32)
    for path in (coded_video, portrait):
        fetched = VideoBytes(f"s3://bucket/{path.name}", path.read_bytes())
        assert torch.equal(decode_views(fetched, geometry), decode_views(path, geometry))
        index_for = lambda n: clip_indices(n, geometry, train=False)  # noqa: E731
        frames = decord_frames(fetched, 32, index_for)
        np.testing.assert_array_equal(frames, decord_frames(path, 32, index_for))
        idx = np.array([0, 3, 5])
        np.testing.assert_array_equal(
            read_frames_pyav(fetched, idx, (32, 43)), read_frames_pyav(path, idx, (32, 43))
        )


def test_train_items_depend_only_on_seed_epoch_index(coded_video, tmp_path):
    cfg = DatasetConfig(num_frames=4)
    records = [ClipRecord(coded_video.name, 0)] * 4
    ds = VideoClipDataset(records, coded_video.parent, ClipGeometry.of_dataset(cfg, 32), train=True, seed=7)
    single = [ds[i]["video"] for i in range(4)]
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_clips)
    in_workers = torch.cat([b["video"] for b in loader])
    assert torch.equal(torch.stack(single), in_workers)
    assert not all(torch.equal(single[0], v) for v in single[1:])  # indices differ
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["video"], single[0])  # epochs differ
    test_ds = VideoClipDataset(records, coded_video.parent, ClipGeometry.of_dataset(cfg, 32), train=False)
    assert torch.equal(test_ds[0]["video"], test_ds[3]["video"])  # testing is deterministic


def test_bad_files_become_error_items_through_workers(coded_video, tmp_path):
    root = tmp_path
    (root / "good.mp4").write_bytes(coded_video.read_bytes())
    write_corrupt_video(root / "corrupt.mp4")
    write_empty_video(root / "empty.mp4")
    write_truncated_video(coded_video, root / "truncated.mp4")  # index at the end: cannot be opened
    long_clip = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    write_video(root / "streamable.mp4", long_clip, faststart=True)
    write_truncated_video(root / "streamable.mp4", root / "cut.mp4")  # opens, then fails mid-decode
    names = ["good.mp4", "corrupt.mp4", "empty.mp4", "missing.mp4", "truncated.mp4", "cut.mp4", "good.mp4"]
    records = [ClipRecord(n, label) for label, n in enumerate(names)]
    ds = VideoClipDataset(records, root, ClipGeometry(num_frames=8, num_crops=3, crop_size=32))
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    videos = torch.cat([b["video"] for b in batches if b["video"] is not None])
    assert videos.shape == (2, 3, 8, 3, 32, 32)
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 6]
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 6]
    failed = {f["path"]: f for b in batches for f in b["failed"]}
    assert sorted(failed) == ["corrupt.mp4", "cut.mp4", "empty.mp4", "missing.mp4", "truncated.mp4"]
    assert failed["missing.mp4"]["error"][0] == "FileNotFoundError"
    assert failed["cut.mp4"]["error"][0] == "DECORDError"  # not a RuntimeError: caught on its own
    for f in failed.values():
        name, message = f["error"]
        assert isinstance(name, str) and message and f["label"] == names.index(f["path"])


def test_collate_all_failed():
    batch = [{"video": None, "label": 3, "index": 0, "path": "a.mp4", "error": ("ValueError", "no frames")}]
    out = collate_clips(batch)
    assert out["video"] is None and out["label"].tolist() == []
    assert out["failed"] == [{"index": 0, "label": 3, "path": "a.mp4", "error": ("ValueError", "no frames")}]

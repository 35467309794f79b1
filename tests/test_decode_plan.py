"""The planned decoder returns decord's frames bit for bit with less decoding; NVDEC falls back to the CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import stage1_extract  # noqa: F401  (first: fixes the torchvision import before anything imports timm)
from stage1_extract.videos import video
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import DatasetConfig
from stage1_extract.videos.decode_plan import PlannedReader, decord_may_miscopy, resolve_decode_device
from stage1_extract.videos.synthetic_k400 import write_k400_like_video

CROP = 64  # 96x128 -> 64x85: a width decord copies correctly


@pytest.fixture(scope="module")
def k400_like(tmp_path_factory) -> Path:
    """3 s at 30 fps, a keyframe every 30 frames, x264 medium (B-frames, b-pyramid): 90 frames, 3 GOPs."""
    return write_k400_like_video(
        tmp_path_factory.mktemp("k400") / "clip.mp4", seed=1, size=(96, 128), seconds=3, gop=30
    )


INDEX_SETS = {
    "uniform 8": np.array([[5, 16, 28, 39, 50, 61, 73, 84]]),
    "3 clips x 4, interleaved": np.array([[3, 26, 48, 71], [11, 33, 56, 78], [18, 41, 63, 86]]),
    "one GOP skipped, repeats": np.array([[0, 1, 1, 2], [60, 61, 89, 89]]),
    "out of order": np.array([[70, 10, 45, 10]]),
    "last frame only": np.array([[89]]),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(INDEX_SETS))
def test_planned_frames_are_decords_frames(k400_like, name, threads):
    idx = INDEX_SETS[name]
    old = video.decord_frames(k400_like, CROP, lambda n: idx)
    new = video.planned_frames(k400_like, CROP, lambda n: idx, threads=threads)
    assert new.shape == old.shape == (*idx.shape, 64, 85, 3)
    assert np.array_equal(new, old)


def test_plan_skips_gops_and_unreferenced_frames(k400_like):
    with PlannedReader(k400_like) as reader:
        assert len(reader) == 90 and reader.keyframes == [0, 30, 60]
        assert reader.needed_gops(np.array([1, 65])) == [0, 2]
        first = reader.read(np.array([5, 16, 28]), (64, 85))  # all in the first GOP
        assert reader.packets_sent <= 30  # never past the first GOP (plus the frames' reorder delay)
        assert reader.frames_decoded < reader.packets_sent  # non-reference B-frames were dropped
        again = reader.read(np.array([28, 5]), (64, 85))  # a second read on the same reader
        assert np.array_equal(again, first[[2, 0]])


@pytest.mark.parametrize("train", [False, True])
def test_decode_views_same_views_as_decord_path(k400_like, monkeypatch, train):
    cfg = DatasetConfig(num_frames=8, sampling="uniform", num_clips=2, num_crops=3)
    new = [decode_views_with(k400_like, cfg, train, seed) for seed in range(3)]

    def unplannable(*args, **kwargs):
        raise video.Unplannable("forced")

    monkeypatch.setattr(video, "planned_frames", unplannable)
    old = [decode_views_with(k400_like, cfg, train, seed) for seed in range(3)]
    for a, b in zip(new, old):
        assert torch.equal(a, b)  # same indices, same random crop, same pixels


def decode_views_with(path: Path, cfg: DatasetConfig, train: bool, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed) if train else None
    return video.decode_views(path, ClipGeometry.of_dataset(cfg, CROP), train=train, rng=rng)


def test_decode_device_cuda_falls_back_to_cpu_with_warning(k400_like):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may decode on NVDEC: the fallback is not what happens there")
    with pytest.warns(RuntimeWarning, match="decoding on the CPU"):
        assert resolve_decode_device("cuda", k400_like) == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_decode_device("cpu", k400_like) == "cpu"
    with pytest.raises(ValueError, match="decode-device"):
        resolve_decode_device("gpu", k400_like)
    cfg = DatasetConfig(num_frames=4, num_crops=1)
    asked_cuda = video.decode_views(
        k400_like, ClipGeometry.of_dataset(cfg, CROP), hwaccel="cuda"
    )  # per file: decord on the CPU
    assert torch.equal(asked_cuda, video.decode_views(k400_like, ClipGeometry.of_dataset(cfg, CROP)))


def test_rotated_videos_are_left_to_decord(tmp_path):
    import av

    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for i in range(6):
            frame = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with pytest.raises(video.Unplannable, match="rotated"):
        video.planned_frames(path, 32, lambda n: np.array([[1, 3]]))


def test_widths_decord_miscopies_are_left_to_its_fallback():
    assert decord_may_miscopy(48) and decord_may_miscopy(72)  # 3*48 = 144 is padded to 192 = 4*48
    assert not any(decord_may_miscopy(w) for w in (43, 85, 224, 298, 299))


def test_extract_with_decode_device_cuda_falls_back_and_matches_cpu(tmp_path):
    """``amflow extract --decode-device cuda`` on a machine without NVDEC: a warning, the CPU's features."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may decode on NVDEC: the fallback is not what happens there")
    from amflow.cli import main
    from stage1_extract.videos.synthetic import make_folder_dataset
    from store.feature_store import FeatureStore

    make_folder_dataset(tmp_path / "v", ["left", "right"], {"train": 1}, 32, 6, seed=0)
    small = ["model.backbone.timm_kwargs.depth=1", "model.backbone.img_size=32", "num_frames=4"]
    common = ["extract", "--dataset", "folder", "--root", str(tmp_path / "v"), "--split", "train", "--config",
              "configs/models/amflow_tiny.yaml", "--decode-workers", "0", *small]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "cpu.zarr")]) == 0
    with pytest.warns(RuntimeWarning, match="decoding on the CPU"):
        assert main([*common, "--out", str(tmp_path / "cuda.zarr"), "--decode-device", "cuda"]) == 0
    cpu, cuda = (FeatureStore.open(tmp_path / f"{d}.zarr") for d in ("cpu", "cuda"))
    assert cuda.done_mask().all() and cuda.num_clips == 2
    assert np.array_equal(np.asarray(cpu.array("embeddings")[:]), np.asarray(cuda.array("embeddings")[:]))

"""Synthetic motion videos: the encoder round trip, that each motion moves as named (measured on the
pixels), that no single frame gives the class away, and that the folder dataset is deterministic."""

from __future__ import annotations

import json

import av
import decord
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import stage1_extract  # noqa: F401  (first: fixes the torchvision import before anything imports timm)
from stage1_extract.videos.datasets import build_index
from stage1_extract.videos.synthetic import (
    MOTIONS,
    make_folder_dataset,
    make_motion_clip,
    render_motion_clip,
    video_codec,
    write_video,
)


def test_write_video_round_trip_with_decord(tmp_path):
    frames = np.zeros((10, 32, 64, 3), dtype=np.uint8)
    frames[..., 0] = (20 * np.arange(10))[:, None, None]
    frames[..., 1] = 200
    frames[..., 2] = 40
    path = write_video(tmp_path / "a.mp4", frames, fps=10)
    assert video_codec() in av.codecs_available
    reader = decord.VideoReader(str(path), num_threads=1)
    assert len(reader) == 10 and reader.get_avg_fps() == pytest.approx(10)
    decoded = reader.get_batch(list(range(10))).asnumpy()
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 33, 32, 3), np.uint8))


def _motion_measures(clip: np.ndarray) -> tuple[float, float, float]:
    """Mean step of the changing pixels' circular centroid (dy, dx, in pixels) and the median log-ratio of
    their counts between steps (> 0 growing), from frame differences alone."""
    f = clip.astype(np.int32)
    height, width = f.shape[1:3]
    changed = np.abs(np.diff(f, axis=0)).sum(-1) > 30
    ys, xs = np.mgrid[0:height, 0:width]
    # unit-free circular means; a step without changed pixels contributes 0 (no direction)
    zy = np.array([np.exp(2j * np.pi * ys[m] / height).sum() / max(m.sum(), 1) for m in changed])
    zx = np.array([np.exp(2j * np.pi * xs[m] / width).sum() / max(m.sum(), 1) for m in changed])
    dy = np.angle(zy[1:] * np.conj(zy[:-1])).mean() * height / (2 * np.pi)
    dx = np.angle(zx[1:] * np.conj(zx[:-1])).mean() * width / (2 * np.pi)
    area = changed.reshape(len(changed), -1).sum(1) + 1
    return dy, dx, float(np.median(np.diff(np.log(area))))


@pytest.mark.parametrize("motion", MOTIONS)
def test_each_motion_moves_as_named(motion):
    for seed in range(6):
        clip = make_motion_clip(motion, size=64, num_frames=8, rng=np.random.default_rng(seed))
        assert clip.shape == (8, 64, 64, 3) and clip.dtype == np.uint8
        dy, dx, growth = _motion_measures(clip)
        expected = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}.get(motion)
        if expected is not None:  # 30-50% of 64 px over 7 steps: 2.7-4.6 px a step
            assert dy * expected[0] + dx * expected[1] > 1.5, (seed, dy, dx)
            assert abs(dy * expected[1] + dx * expected[0]) < 0.3, (seed, dy, dx)
        else:
            assert growth > 0 if motion == "approach" else growth < 0, (seed, growth)


def test_panning_moves_the_background():
    def changed_fraction(pan: bool) -> float:
        clips = [
            make_motion_clip("left", size=48, num_frames=8, rng=np.random.default_rng(s), pan=pan)
            for s in range(5)
        ]
        return float(np.mean([(np.abs(np.diff(c.astype(int), axis=0)).sum(-1) > 10).mean() for c in clips]))

    assert changed_fraction(pan=False) < 0.15 < 0.6 < changed_fraction(pan=True)


def test_camera_override_films_the_same_scene():
    """The drawn path given back reproduces the clip; frame 1's camera for every frame leaves the
    background where the object is in neither frame unchanged (a perfect stabiliser), and the object mask
    of the first frame as drawn."""
    clip = render_motion_clip("left", size=32, num_frames=4, rng=np.random.default_rng(3), pan=True)
    again = render_motion_clip("left", size=32, num_frames=4, rng=np.random.default_rng(3), pan=True,
                               camera=clip.camera)  # fmt: skip
    assert np.array_equal(again.frames, clip.frames)
    still = render_motion_clip("left", size=32, num_frames=4, rng=np.random.default_rng(3), pan=True,
                               camera=np.repeat(clip.camera[:1], 4, 0))  # fmt: skip
    assert np.array_equal(still.frames[0], clip.frames[0]) and np.abs(clip.camera[-1]).max() > 3
    background = ~(still.object_mask[0] | still.object_mask[-1])
    assert np.array_equal(still.frames[-1][background], still.frames[0][background])
    assert not np.array_equal(clip.frames[-1][background], clip.frames[0][background])
    with pytest.raises(ValueError, match=r"camera: expected \(4, 2\)"):
        render_motion_clip("left", size=32, num_frames=4, rng=np.random.default_rng(3), camera=np.zeros(4))


def _geometry(frame: np.ndarray) -> tuple[np.ndarray, float]:
    """Object position (circular centroid angles) and log size, segmenting one frame against its median
    colour; meaningful for plain backgrounds (the caller drops frames where the 'object' is huge)."""
    f = frame.astype(np.float32)
    mask = np.abs(f - np.median(f.reshape(-1, 3), axis=0)).sum(-1) > 45
    size = frame.shape[0]
    ys, xs = np.nonzero(mask)
    angle_y = np.angle(np.exp(2j * np.pi * ys / size).mean()) if len(ys) else 0.0
    angle_x = np.angle(np.exp(2j * np.pi * xs / size).mean()) if len(xs) else 0.0
    return np.array([angle_y, angle_x, np.log(mask.mean() + 1e-3)]), float(mask.mean())


def test_no_single_frame_reveals_the_class():
    """Linear models on the last frame's object position and size stay near chance; the same measures
    over consecutive frames classify the motion."""

    def features(seed_split: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        single, motion, labels = [], [], []
        for c, name in enumerate(MOTIONS):
            for k in range(40):
                clip = make_motion_clip(
                    name, size=48, num_frames=8, rng=np.random.default_rng((seed_split, c, k))
                )
                geo = [_geometry(f) for f in clip]
                if max(a for _, a in geo) > 0.45:  # textured background: no plain colour to segment against
                    continue
                g = np.array([x for x, _ in geo])
                steps = np.diff(g, axis=0)
                steps[:, :2] = (steps[:, :2] + np.pi) % (2 * np.pi) - np.pi
                y, x, log_size = g[-1]
                single.append([np.cos(y), np.sin(y), np.cos(x), np.sin(x), log_size])
                motion.append(np.median(steps, axis=0))
                labels.append(c)
        return np.array(single), np.array(motion), np.array(labels)

    train_single, train_motion, y_train = features(0)
    test_single, test_motion, y_test = features(1)
    assert min(np.bincount(y_test)) >= 10

    def accuracy(x_train, x_test, rows_train=slice(None), rows_test=slice(None)) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(x_train[rows_train], y_train[rows_train])
        return model.score(x_test[rows_test], y_test[rows_test])

    assert accuracy(train_single, test_single) < 0.3  # chance: 1/6
    scaling_train, scaling_test = y_train >= 4, y_test >= 4  # approach vs recede by the last frame's size
    assert accuracy(train_single[:, 4:], test_single[:, 4:], scaling_train, scaling_test) < 0.75
    assert accuracy(train_motion, test_motion) > 0.9


def test_folder_dataset_is_deterministic_and_readable(tmp_path):
    counts = {"train": 3, "val": 1, "test": 2}
    motions = ["up", "left", "right"]
    a = make_folder_dataset(tmp_path / "a", motions, counts, size=32, num_frames=8, seed=5, pan_fraction=0.5)
    make_folder_dataset(tmp_path / "b", motions, counts, size=32, num_frames=8, seed=5, pan_fraction=0.5)
    make_folder_dataset(tmp_path / "c", motions, counts, size=32, num_frames=8, seed=6, pan_fraction=0.5)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.mp4"))
    assert len(files) == 18 and not list((tmp_path / "a").rglob("*.tmp"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    assert a["classes"] == ["left", "right", "up"] and a["clips"] == {"train": 9, "val": 3, "test": 6}
    assert a["panning"] == {"train": 6, "val": 0, "test": 3}  # round(0.5 * n) clips of each class: 2, 0, 1
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert sum(m["pan"] for m in manifest["files"]) == 9
    index = build_index("folder", tmp_path / "a", "train")
    assert index.classes == a["classes"] and len(index.records) == 9
    assert [r.label for r in index.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(r.path.split("/")[1] == index.classes[r.label] for r in index.records)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_folder_dataset(tmp_path / "d", motions, {"dev": 1}, size=32, num_frames=8, seed=0)
    with pytest.raises(ValueError, match="motions"):
        make_folder_dataset(tmp_path / "d", ["sideways"], counts, size=32, num_frames=8, seed=0)

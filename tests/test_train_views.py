"""``amflow extract --train-views K``: K seeded augmented training views per clip in the view axis."""

import numpy as np
import pytest
import torch

from amflow.cli import main
from stage1_extract.extraction.train_views import train_views
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import DatasetConfig
from stage1_extract.videos.sampling import uniform_indices
from stage1_extract.videos.synthetic import make_folder_dataset
from stage1_extract.videos.video import decode_views
from store.feature_store import FeatureStore

TINY = "configs/models/amflow_tiny.yaml"
SMALL = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    make_folder_dataset(root, ["left", "up"], {"train": 2}, 40, 12, seed=0)
    return root


def extract(videos, out, *extra):
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--split", "train", "--config", TINY]
    return main([*args, "--out", str(out), "--decode-workers", "0", "--shard-clips", "2", *extra, *SMALL])


def test_train_views_are_seeded_training_samples(videos):
    cfg = DatasetConfig(num_frames=4, train_crop="random")
    path = videos / "train" / "left" / "left_0000.mp4"
    a = train_views(path, ClipGeometry.of_dataset(cfg, 32), views=3, flip=0.5, seed=7, clip_index=5)
    assert a.shape == (3, 4, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(
        a, train_views(path, ClipGeometry.of_dataset(cfg, 32), views=3, flip=0.5, seed=7, clip_index=5)
    )
    assert not torch.equal(
        a, train_views(path, ClipGeometry.of_dataset(cfg, 32), views=3, flip=0.5, seed=8, clip_index=5)
    )
    assert not torch.equal(a[0], a[1])  # other frames and crops per view
    # View k is exactly the training sample drawn from default_rng((seed, clip, k)), flipped on its draw.
    rng = np.random.default_rng((7, 5, 1))
    view = decode_views(path, ClipGeometry.of_dataset(cfg, 32), train=True, rng=rng)
    view = view.flip(-1) if rng.random() < 0.5 else view
    assert torch.equal(a[1:2], view)
    # Random frames: one per segment of the 12-frame video, drawn as uniform_indices does in training.
    idx = uniform_indices(12, 4, rng=np.random.default_rng(0))
    assert ((idx >= [0, 3, 6, 9]) & (idx < [3, 6, 9, 12])).all()


def test_extract_stores_k_views_reproducibly(videos, tmp_path):
    assert extract(videos, tmp_path / "a.zarr", "--train-views", "3") == 0
    assert extract(videos, tmp_path / "b.zarr", "--train-views", "3", "--shard-clips", "4") == 0
    assert extract(videos, tmp_path / "test.zarr") == 0
    a, b, t = (FeatureStore.open(tmp_path / f"{n}.zarr") for n in ("a", "b", "test"))
    assert a.layout.num_views == 3 and t.layout.num_views == 1
    emb = np.asarray(a.array("embeddings")[:])
    np.testing.assert_array_equal(emb, np.asarray(b.array("embeddings")[:]))  # other batching, same views
    assert not np.array_equal(emb[:, :, 0], emb[:, :, 1])
    assert a.provenance["train_views"] == {"views": 3, "flip": 0.0, "seed": 0}
    assert a.fingerprint == t.fingerprint  # comparable with a test-view validation store

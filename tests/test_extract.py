"""Stage 1 end to end on generated mp4 files: store contents, failures, resume, dask workers."""

import numpy as np
import pytest
import torch

from amflow.cli import main
from stage1_extract.extraction.extract import (
    ExtractOptions,
    extract_shards,
    load_extraction_model,
    plan_extraction,
)
from stage1_extract.methods.models import load_feature_config
from stage1_extract.videos.synthetic import make_folder_dataset, write_corrupt_video, write_empty_video
from stage1_extract.videos.video import VideoClipDataset
from store.feature_store import FeatureStore

TINY = "configs/models/amflow_tiny.yaml"
SMALL = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    make_folder_dataset(root, ["left", "right", "up"], {"train": 3, "val": 1}, 32, 6, seed=0)
    write_corrupt_video(root / "train" / "left" / "corrupt.mp4")
    write_empty_video(root / "train" / "up" / "empty.mp4")
    return root


def extract(videos, out, *extra):
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--split", "train", "--config", TINY]
    return main([*args, "--out", str(out), "--decode-workers", "0", "--shard-clips", "4", *extra, *SMALL])


def test_extract_records_failures_and_matches_the_model(videos, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert extract(videos, out, "--flow", "--decode-workers", "1") == 0
    store = FeatureStore.open(out)
    assert store.num_clips == 11 and store.done_mask().sum() == 9
    failures = {f["clip_id"]: f for f in store.failures()}
    assert set(failures) == {"train/left/corrupt.mp4", "train/up/empty.mp4"}
    assert all(f["message"] for f in failures.values())
    assert store.class_names == ["left", "right", "up"]
    assert store.adapter_names[:2] == ["block1.attn", "block1.mlp"] and len(store.adapter_names) == 4

    # Independent check: decode one clip and run the model by hand.
    i = int(store.index_of("train/right/right_0001.mp4"))
    plan, _ = plan_extraction(
        "folder",
        videos,
        "train",
        TINY,
        tmp_path / "other.zarr",
        overrides=SMALL,
    )
    from stage1_extract.videos.datasets import ClipRecord

    item = VideoClipDataset([ClipRecord("train/right/right_0001.mp4", 1)], videos, plan.geometry)[0]
    cfg = load_feature_config(TINY, [o[6:] for o in SMALL[:2]] + ["num_frames=4", "num_classes=3"])
    model = load_extraction_model(cfg, None, torch.device("cpu"))
    mean = torch.tensor(model.vit.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(model.vit.pretrained_cfg["std"]).view(3, 1, 1)
    with torch.no_grad():
        feats = model.extract((item["video"].float() / 255 - mean) / std)
    clip = store.read_clip(i)
    np.testing.assert_allclose(clip["embeddings"][:, 0], feats.embeddings[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(clip["cls"][0], feats.cls[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(clip["flow"][:, 0], feats.flow[0].numpy(), rtol=2e-3, atol=2e-3)

    capsys.readouterr()
    assert extract(videos, out, "--flow") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert extract(videos, out, "--flow", "--strict") == 1


def test_resume_processes_only_missing_clips(videos, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    plan, store = plan_extraction(
        "folder",
        videos,
        "train",
        TINY,
        out,
        overrides=SMALL,
        options=ExtractOptions(shard_clips=4, decode_workers=0),
    )
    extract_shards(plan, [1])  # an interrupted run that finished one shard
    counts = FeatureStore.open(out).counts()  # clips 4-7: right_0000..0002 and up/empty.mp4
    assert (counts["done"], counts["failed"]) == (3, 1)
    capsys.readouterr()
    assert extract(videos, out) == 0
    printed = capsys.readouterr().out
    assert "skipped (already done)  3" in printed and "processed this run      7" in printed
    assert FeatureStore.open(out).is_complete()


def test_dask_workers_give_the_same_store(videos, tmp_path):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    assert extract(videos, one, "--flow") == 0
    assert extract(videos, two, "--flow", "--workers", "2") == 0
    a, b = FeatureStore.open(one), FeatureStore.open(two)
    assert list(a.clip_ids) == list(b.clip_ids)
    assert np.array_equal(a.done_mask(), b.done_mask())
    assert [f["clip_id"] for f in a.failures()] == [f["clip_id"] for f in b.failures()]
    for name in ("embeddings", "cls", "flow"):
        x, y = a.array(name)[:], b.array(name)[:]
        done = a.done_mask()
        assert np.array_equal(x[done], y[done]), name

"""``amflow predict``: the same probabilities as evaluate's predictions CSV for the same clips (train-heads
runs), as the finetuning's own validation (finetune runs) and as the merge (ZeroI2V); exports; windows."""

import csv
import json

import numpy as np
import pytest

from amflow.cli import main
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.synthetic import make_folder_dataset, write_corrupt_video
from stage2_temporal.training.predictions import read_predictions

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

TINY = "configs/models/amflow_tiny.yaml"
SMALL = [
    "model.backbone.timm_kwargs.depth=2",
    "model.backbone.img_size=32",
    "model.bottleneck=16",
    "num_frames=4",
    "num_clips=2",
]
HEADS = ["heads.hidden=16", "heads.flow_embed=16", "heads.flow_hidden=16", "heads.flow_grid=4", "epochs=3"]


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory):
    """A train-heads run on a store extracted from generated videos (2 views per clip, AM-flow maps)."""
    tmp = tmp_path_factory.mktemp("predict")
    videos = tmp / "videos"
    make_folder_dataset(videos, ["left", "right", "up"], {"train": 2}, 32, 12, seed=0)
    write_corrupt_video(videos / "train" / "up" / "corrupt.mp4")
    store = tmp / "train.zarr"
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--split", "train", "--config", TINY]
    assert main([*args, "--out", str(store), "--flow", "--decode-workers", "0", *SMALL]) == 0
    run = tmp / "run"
    args = [
        "train-heads",
        "--store",
        str(store),
        "--val-store",
        str(store),
        "--config",
        "configs/heads/tiny.yaml",
    ]
    assert main([*args, "--out", str(run), "--quiet", *HEADS]) == 0
    assert main(["evaluate", "--store", str(store), "--run", str(run), "--quiet"]) == 0
    return videos, store, run


def predict_json(capsys, *argv):
    capsys.readouterr()
    assert main(["predict", *argv, "--json", "--decode-workers", "0", "--device", "cpu", "--quiet"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_predict_equals_evaluate_predictions_csv(heads_run, capsys, tmp_path):
    videos, store, run = heads_run
    expected = read_predictions(run / "predictions_train.csv")
    assert len(expected["clip_ids"]) == 6
    lines, err = predict_json(
        capsys, str(videos / "train"), "--run", str(run), "--out", str(tmp_path / "p.csv")
    )
    # the corrupt video is reported and skipped; the six good ones are scored
    assert "skipped" in err and "corrupt.mp4" in err
    assert [line["video"] for line in lines] == [str(videos / c) for c in expected["clip_ids"]]
    for line, probs in zip(lines, expected["probs"]):
        top = line["top5"]
        assert len(top) == 3 and [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
        got = np.array([next(t["prob"] for t in top if t["label"] == c) for c in expected["class_names"]])
        np.testing.assert_allclose(got, probs, atol=1e-3)
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["video"] for r in rows] == [line["video"] for line in lines]
    assert [r["label1"] for r in rows] == [line["top5"][0]["label"] for line in lines]

    # the table: one block per video, the top class first
    capsys.readouterr()
    one = str(videos / "train" / "left" / "left_0000.mp4")
    assert main(["predict", one, "--run", str(run), "--decode-workers", "0", "--quiet"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == one and table[1].startswith(f"  1. {lines[0]['top5'][0]['label']}")


def test_predict_errors_name_the_argument(heads_run, tmp_path, capsys):
    videos, store, run = heads_run
    assert main(["predict", str(videos), "--run", str(tmp_path)]) == 2
    assert "neither heads.safetensors" in capsys.readouterr().err
    (tmp_path / "w.safetensors").write_bytes(b"not weights")
    assert (
        main(["predict", str(videos), "--run", str(run), "--weights", str(tmp_path / "w.safetensors")]) == 2
    )
    assert "--weights" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.mp4"), "--run", str(run), "--decode-workers", "0"]) == 1
    assert "missing.mp4" in capsys.readouterr().err


def all_probs(lines):
    """{video: {label: prob}} from predict's JSON lines."""
    return {line["video"]: {t["label"]: t["prob"] for t in line["top5"]} for line in lines}


def assert_same_predictions(a, b, atol):
    assert a.keys() == b.keys()
    for video in a:
        assert a[video].keys() == b[video].keys()
        for label in a[video]:
            assert a[video][label] == pytest.approx(b[video][label], abs=atol), (video, label)


def test_export_predicts_as_the_run_without_it(heads_run, capsys, tmp_path):
    videos, store, run = heads_run
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    # the run directory and the store are gone: the file alone predicts
    moved = tmp_path / "moved"
    run.rename(moved)
    try:
        from_file, _ = predict_json(capsys, str(videos / "train"), "--model", str(out))
    finally:
        moved.rename(run)
    from_run, _ = predict_json(capsys, str(videos / "train"), "--run", str(run))
    assert len(from_file) == 6
    assert_same_predictions(all_probs(from_file), all_probs(from_run), atol=1e-6)


@pytest.fixture(scope="module")
def zeroi2v_run(tmp_path_factory):
    """One epoch of ZeroI2V finetuning on generated videos (12 train, 6 val clips)."""
    from stage2_temporal.finetuning.finetune import finetune, plan_finetune

    tmp = tmp_path_factory.mktemp("zeroi2v")
    videos = tmp / "videos"
    make_folder_dataset(videos, ["left", "right", "up"], {"train": 4, "val": 2}, 32, 8, seed=1)
    overrides = ["model.backbone.img_size=32", "model.backbone.timm_kwargs.depth=2", "num_frames=4"]
    overrides += ["model.num_classes=3"]
    plan = plan_finetune(
        "folder",
        videos,
        "configs/models/zeroi2v_tiny.yaml",
        recipe="configs/finetune/tiny.yaml",
        overrides=[*overrides, "epochs=1", "data.num_crops=3"],
    )
    finetune(plan, tmp / "run", progress=False)
    return videos, plan, tmp / "run"


def test_finetune_run_merged_model_and_export_agree(zeroi2v_run, capsys, tmp_path):
    import torch

    from stage1_extract.videos.video import VideoClipDataset
    from stage2_temporal.finetuning.finetune import Distributed, evaluate_clips
    from stage2_temporal.inference.predict import load_predictor

    videos, plan, run = zeroi2v_run
    lines, _ = predict_json(capsys, str(videos / "val"), "--run", str(run))
    from_run = all_probs(lines)
    # the finetuning's own validation code on the same clips (3 crops per clip, averaged)
    predictor = load_predictor(run, device="cpu")
    dataset = VideoClipDataset(plan.val.records, videos, plan.geometry)
    probs, decoded = evaluate_clips(predictor.model, dataset, 3, 4, torch.device("cpu"), None, Distributed())
    assert decoded.all() and predictor.num_views == 3
    names = plan.train.classes
    expected = {str(videos / r.path): dict(zip(names, p)) for r, p in zip(plan.val.records, probs)}
    assert_same_predictions(from_run, expected, atol=1e-5)

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(run / "best.safetensors"), "--out", str(merged)]) == 0
    # a merged model knows no sampling beyond its frames: one centre view, as the run's single-view clip
    single = VideoClipDataset(plan.val.records, videos, ClipGeometry(num_frames=4, crop_size=32))
    one_view, _ = evaluate_clips(predictor.model, single, 3, 4, torch.device("cpu"), None, Distributed())
    lines, _ = predict_json(capsys, str(videos / "val"), "--model", str(merged))
    from_merged = all_probs(lines)
    assert set(next(iter(from_merged.values()))) == set(names)  # the class names travel with the merge
    one = {str(videos / r.path): dict(zip(names, p)) for r, p in zip(plan.val.records, one_view)}
    assert_same_predictions(from_merged, one, atol=1e-4)

    for source, reference in ((run, from_run), (merged, from_merged)):
        out = tmp_path / f"{source.stem}.export.safetensors"
        assert main(["export", str(source), "--out", str(out)]) == 0
        lines, _ = predict_json(capsys, str(videos / "val"), "--model", str(out))
        assert_same_predictions(all_probs(lines), reference, atol=1e-6)


def test_windows_of_a_long_video_are_sampled_as_clips(heads_run, capsys, tmp_path):
    """A 3 s video (left, right, up motions, 1 s each at 12 fps) scored in 1 s windows every 0.5 s."""
    import torch
    from PIL import Image

    from stage1_extract.videos.synthetic import make_motion_clip, write_video
    from stage1_extract.videos.video import open_video
    from stage2_temporal.inference.predict import load_predictor

    videos, store, run = heads_run
    rng = np.random.default_rng(0)
    parts = [make_motion_clip(m, size=32, num_frames=12, rng=rng) for m in ("left", "right", "up")]
    long = write_video(tmp_path / "long.mp4", np.concatenate(parts), fps=12)
    out = tmp_path / "timeline.csv"
    argv = ["predict", str(long), "--run", str(run), "--window", "1", "--stride", "0.5", "--out", str(out)]
    assert main([*argv, "--decode-workers", "0", "--device", "cpu", "--quiet", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(w["start"], w["end"]) for w in lines] == [
        (0.0, 1.0),
        (0.5, 1.5),
        (1.0, 2.0),
        (1.5, 2.5),
        (2.0, 3.0),
    ]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["start"]) for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [r["label1"] for r in rows] == [w["top5"][0]["label"] for w in lines]
    with Image.open(out.with_suffix(".png")) as png:
        assert png.size[0] > 100 and png.size[1] > 100

    # Window 3 is frames [12, 24): the run samples 2 clips of 4 frames (uniform, K=2), by hand the
    # frames 12+{0, 3, 6, 9} and 12+{2, 5, 8, 11}.
    predictor = load_predictor(run, device="cpu")
    frames = open_video(long).get_batch(list(range(36))).asnumpy()
    views = [frames[[12, 15, 18, 21]], frames[[14, 17, 20, 23]]]
    video = torch.from_numpy(np.stack(views)).permute(0, 1, 4, 2, 3).unsqueeze(0).contiguous()
    expected = dict(zip(predictor.class_names, predictor(video)[0]))
    got = {t["label"]: t["prob"] for t in lines[2]["top5"]}
    assert got == pytest.approx(expected, abs=1e-6)


def test_runs_without_recorded_features_rebuild_stage1_from_the_fingerprint(heads_run, capsys, tmp_path):
    """Sweep runs (and runs from before ``features`` was recorded) hold only the feature fingerprint."""
    import shutil

    videos, store, run = heads_run
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    record = json.loads((bare / "fingerprint.json").read_text())
    assert record.pop("features")["config"]["model"]["backbone"]["name"] == "vit_tiny_patch16_224"
    (bare / "fingerprint.json").write_text(json.dumps(record))
    a, _ = predict_json(capsys, str(videos / "train" / "left"), "--run", str(run))
    b, _ = predict_json(capsys, str(videos / "train" / "left"), "--run", str(bare))
    assert len(a) == 2
    assert_same_predictions(all_probs(a), all_probs(b), atol=1e-7)

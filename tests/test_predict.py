"""``amflow predict``: the same probabilities as evaluate's predictions CSV for the same clips (train-heads
runs), as the finetuning's own validation (finetune runs) and as the merge (ZeroI2V); exports; windows."""

import csv
import json

import numpy as np
import pytest

from amflow.cli import main
from stage1_extract.synthetic import make_folder_dataset, write_corrupt_video
from stage2_temporal.predictions import read_predictions

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

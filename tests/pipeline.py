"""Stage 2 of the pipeline on an extracted store, as a user runs it: train-heads, evaluate, then predict on
the videos themselves, whose probabilities must equal evaluate's predictions CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from amflow.cli import main
from stage2_temporal.training.predictions import read_predictions


def train_evaluate_predict(store: Path, run: Path, videos: Path, heads: list[str], capsys) -> None:
    """Heads of ``configs/heads/tiny.yaml`` (with ``heads`` overrides) trained and evaluated on ``store``;
    ``amflow predict --run`` on ``videos/train`` gives evaluate's probabilities (to 1e-3, float16 cache)."""
    train = [
        "train-heads",
        "--store",
        str(store),
        "--val-store",
        str(store),
        "--config",
        "configs/heads/tiny.yaml",
    ]
    assert main([*train, "--out", str(run), "--quiet", *heads]) == 0
    assert main(["evaluate", "--store", str(store), "--run", str(run), "--quiet"]) == 0
    expected = read_predictions(run / "predictions_train.csv")
    capsys.readouterr()
    predict = ["predict", str(videos / "train"), "--run", str(run), "--json", "--decode-workers", "0"]
    assert main([*predict, "--device", "cpu", "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["video"] for line in lines] == [str(videos / c) for c in expected["clip_ids"]]
    for line, probs in zip(lines, expected["probs"]):
        got = np.array(
            [next(t["prob"] for t in line["top5"] if t["label"] == c) for c in expected["class_names"]]
        )
        np.testing.assert_allclose(got, probs, atol=1e-3)

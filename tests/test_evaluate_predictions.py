"""evaluate's per-clip predictions CSV (read back with the csv module, checked against the heads' own
probabilities) and the ensemble of several runs (metrics of the averaged probabilities, computed by hand)."""

import argparse
import csv

import numpy as np
import pytest

from amflow.commands import evaluate as evaluate_command
from stage2_temporal.heads import HEAD_TYPES
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.data import load_store
from stage2_temporal.training.evaluate import evaluate_ensemble
from stage2_temporal.training.predictions import average_runs, read_predictions
from stage2_temporal.training.run_dir import load_heads
from stage2_temporal.training.synthetic import synthetic_cache, write_store
from stage2_temporal.training.train import predict_proba, select_for_heads, train_heads_from_stores


def command(module, argv):
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ensemble")
    fields = {"model": {"name": "tiny"}, "dtype": "float16"}
    write_store(synthetic_cache(96, seed=0), tmp / "train.zarr", fields)
    write_store(synthetic_cache(32, seed=1, num_views=2), tmp / "val.zarr", fields)
    write_store(synthetic_cache(40, seed=2, num_views=2), tmp / "test.zarr", fields)
    runs = []
    for i, kind in enumerate(("lstm", "tcn")):
        heads = HEAD_TYPES[kind][0](hidden=16, layers=1, flow_embed=8, flow_hidden=8)
        cfg = TrainConfig(heads=heads, epochs=3, lr=1e-2, warmup_epochs=1, patience=None, seed=i)
        train_heads_from_stores(tmp / "train.zarr", tmp / "val.zarr", cfg, tmp / kind, progress=False)
        runs.append(tmp / kind)
    return tmp, runs


def test_predictions_csv_holds_the_heads_probabilities(two_runs, capsys):
    tmp, (run, _) = two_runs
    assert command(evaluate_command, ["evaluate", "--store", str(tmp / "test.zarr"), "--run", str(run)]) == 0
    assert "predictions_test.csv" in capsys.readouterr().out
    with (run / "predictions_test.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    data = load_store(tmp / "test.zarr", with_flow=False, progress=False)
    assert rows[0] == ["clip_id", "label", "prediction", "confidence", *data.class_names]
    assert len(rows) == 41 and [r[0] for r in rows[1:]] == data.clip_ids
    classifier, info = load_heads(run)
    expected = predict_proba(classifier, select_for_heads(data, info))
    probs = np.array([[float(x) for x in r[4:]] for r in rows[1:]])
    np.testing.assert_allclose(probs, expected, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    for r, p, label in zip(rows[1:], expected, data.labels):
        assert r[1] == data.class_names[label]
        assert r[2] == data.class_names[int(p.argmax())] and float(r[3]) == pytest.approx(p.max())


def test_ensemble_averages_the_runs_probabilities(two_runs, capsys):
    tmp, runs = two_runs
    argv = ["evaluate", "--store", str(tmp / "test.zarr"), "--run", str(runs[0]), "--run", str(runs[1])]
    argv += ["--overwrite"]  # runs[0] was evaluated on this store above
    assert command(evaluate_command, argv) == 0
    assert "ensemble of 2 runs" in capsys.readouterr().out
    ensemble, single = evaluate_ensemble(runs, tmp / "test.zarr", progress=False)
    a, b = (read_predictions(r / "predictions_test.csv") for r in runs)
    mean = (a["probs"] + b["probs"]) / 2
    labels = np.array([a["class_names"].index(name) for name in a["labels"]])
    assert ensemble["top1"] == pytest.approx(float((mean.argmax(axis=1) == labels).mean()))
    per_class = [(mean.argmax(axis=1)[labels == c] == c).mean() for c in range(4)]
    assert ensemble["mean_class_acc"] == pytest.approx(float(np.mean(per_class)))
    assert [m["top1"] for m in single] == [
        pytest.approx(float((p["probs"].argmax(axis=1) == labels).mean())) for p in (a, b)
    ]


def test_ensemble_refuses_runs_on_other_clips_or_classes():
    p = np.full((2, 3), 1 / 3)
    assert average_runs(
        [("a", ["x", "y"], ["c0", "c1", "c2"], p), ("b", ["x", "y"], ["c0", "c1", "c2"], 2 * p)]
    )[0, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="--run b: scores other clips than --run a"):
        average_runs([("a", ["x", "y"], None, p), ("b", ["y", "x"], None, p)])
    with pytest.raises(ValueError, match="--run b: other classes"):
        average_runs([("a", ["x", "y"], ["c0", "c1", "c2"], p), ("b", ["x", "y"], ["c0", "c2", "c1"], p)])

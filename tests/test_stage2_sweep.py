"""Sweeps: every combination once, a stable directory per combination, and a restart that skips finished
runs (in this process and on dask.distributed workers)."""

import argparse
import csv

import pytest
import yaml

from amflow.commands import sweep as sweep_command
from stage2_temporal.sweeps.sweep import SweepGrid, expand_grid, load_grid, run_sweep
from stage2_temporal.training.run_dir import read_metrics
from stage2_temporal.training.synthetic import synthetic_cache, write_store

FIXED = {"epochs": 3, "heads.hidden": 8, "heads.flow_embed": 8, "heads.flow_hidden": 8, "patience": None}


@pytest.fixture(scope="module")
def caches():
    return synthetic_cache(64, seed=0), synthetic_cache(32, seed=1)


def mtimes(sweep_dir):
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("runs/*/metrics.json")}


def test_grid_expansion_is_stable_and_validated(tmp_path):
    runs = expand_grid(load_grid("configs/sweeps/smarthome.yaml"), tmp_path)
    assert len(runs) == 80 and len({r.run_id for r in runs}) == 80  # 96 less 16 transformer repeats
    again = expand_grid(load_grid("configs/sweeps/smarthome.yaml"), tmp_path / "elsewhere")
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    assert {r.config.heads.type for r in runs} == {"lstm", "tcn", "transformer"}
    assert len(expand_grid(load_grid("configs/sweeps/tiny.yaml"), tmp_path)) == 8
    with pytest.raises(ValueError, match=r"heads.typo"):
        expand_grid(SweepGrid(base="heads/tiny.yaml", grid={"heads.typo": [1]}), tmp_path)


def test_sweep_resumes_without_redoing_finished_runs(caches, tmp_path):
    train, val = caches
    half = SweepGrid(base="heads/tiny.yaml", fixed=FIXED, grid={"heads.type": ["lstm", "tcn"], "lr": [3e-3]})
    full = SweepGrid(
        base="heads/tiny.yaml", fixed=FIXED, grid={"heads.type": ["lstm", "tcn"], "lr": [3e-3, 1e-2]}
    )
    # "Interrupted" after 2 of 4 combinations: the first half of the grid, in this process.
    first = run_sweep(train, val, half, tmp_path, workers=0, progress=False)
    assert (first.trained, first.skipped) == (2, 0)
    before = mtimes(tmp_path)

    # Restarted on a dask worker process: only the 2 missing runs train.
    second = run_sweep(train, val, full, tmp_path, workers=1, progress=False)
    assert (second.runs, second.trained, second.skipped, second.failed) == (4, 2, 2, [])
    after = mtimes(tmp_path)
    assert len(after) == 4 and all(after[k] == v for k, v in before.items())

    # A run killed before its metrics.json is redone, the others are not.
    victim = sorted(after)[0]
    (tmp_path / "runs" / victim / "metrics.json").unlink()
    third = run_sweep(train, val, full, tmp_path, workers=0, progress=False)
    assert (third.trained, third.skipped) == (1, 3)
    final = mtimes(tmp_path)
    assert all(final[k] == after[k] for k in after if k != victim) and final[victim] != after[victim]

    rows = list(csv.DictReader(second.leaderboard_csv.open()))
    scores = [float(r["val_mean_class_acc"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert scores[0] == pytest.approx(
        read_metrics(tmp_path / "runs" / rows[0]["run"])["val"]["mean_class_acc"]
    )
    assert {r["heads.type"] for r in rows} == {"lstm", "tcn"}
    assert (tmp_path / "leaderboard.md").read_text().count("\n") == 6
    assert (tmp_path / "leaderboard.png").is_file()


def test_a_failing_combination_is_recorded_not_fatal(caches, tmp_path):
    train, val = caches
    combos = {"heads.type": ["lstm", "transformer"], "heads.attn_heads": [3]}
    grid = SweepGrid(base="heads/tiny.yaml", fixed={**FIXED, "epochs": 1}, grid=combos)
    result = run_sweep(train, val, grid, tmp_path, workers=0, progress=False)
    assert result.trained == 1 and len(result.failed) == 1
    assert (
        "attn_heads=3 must divide"
        in (tmp_path / "runs" / result.failed[0].split("/")[-1] / "error.txt").read_text()
    )
    rows = list(csv.DictReader(result.leaderboard_csv.open()))
    assert [r["status"] for r in rows] == ["done", "failed"]


def test_sweep_command_on_stores(tmp_path, capsys):
    fields = {"model": "tiny"}
    write_store(synthetic_cache(48, seed=0), tmp_path / "train.zarr", fields)
    write_store(synthetic_cache(24, seed=1), tmp_path / "val.zarr", fields)
    fixed = {**FIXED, "epochs": 2}
    grid = {"base": "heads/tiny.yaml", "fixed": fixed, "grid": {"heads.flow_maps": [True, False]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    argv = ["sweep", "--store", str(tmp_path / "train.zarr"), "--val-store", str(tmp_path / "val.zarr")]
    argv += [
        "--grid",
        str(tmp_path / "grid.yaml"),
        "--out",
        str(tmp_path / "sweep"),
        "--workers",
        "0",
        "--quiet",
    ]
    parser = argparse.ArgumentParser()
    sweep_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert (
        "2 runs: 2 trained, 0 already finished, 0 failed" in out and "| rank | run | heads.flow_maps |" in out
    )
    assert args.func(args) == 0
    assert "2 runs: 0 trained, 2 already finished" in capsys.readouterr().out


def test_sweep_skips_combinations_a_head_type_ignores(tmp_path, caplog):
    caplog.set_level("INFO", logger="stage2_temporal.sweeps.sweep")
    runs = expand_grid(load_grid("configs/sweeps/smarthome.yaml"), tmp_path)
    assert len(runs) == 96 - 16  # transformer heads have no heads.hidden: their two sizes are one run
    assert len({r.run_id for r in runs}) == len(runs)
    transformer = [r for r in runs if r.config.heads.type == "transformer"]
    assert len(transformer) == 16 and all(r.combination["heads.hidden"] == "n/a" for r in transformer)
    assert "skipped 16 combinations of transformer heads" in caplog.text and "heads.hidden" in caplog.text

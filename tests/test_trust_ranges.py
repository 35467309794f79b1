"""Issue 21 §4, values outside their range are refused, never reinterpreted: every option's range is enforced
when it is parsed (one line, exit 2), sizes that only a video reveals are bounded before decoding, an
input that is not what a command takes is refused by its content, and outputs say what they hold."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest

from amflow.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

EXTRACT = ["extract", "--dataset", "folder", "--root", "r", "--split", "train", "--config", "c", "--out", "o"]
PREDICT = ["predict", "v.mp4", "--model", "m.safetensors"]
STORES = ["--store", "s.zarr", "--val-store", "v.zarr"]


def parse_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amflow "), err
    return err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*PREDICT, "--window", "4", "--stride", "0"], "argument --stride: expected a number > 0, got 0"),
        ([*PREDICT, "--window", "4", "--stride", "-1"], "argument --stride: expected a number > 0"),
        ([*PREDICT, "--window", "nan"], "argument --window: expected a number > 0, got nan"),
        ([*PREDICT, "--window", "inf"], "argument --window: expected a number > 0, got inf"),
        ([*PREDICT, "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        ([*PREDICT, "--decode-workers", "-1"], "argument --decode-workers: expected an integer >= 0"),
        ([*PREDICT, "--batch-size", "2.5"], "argument --batch-size: expected an integer >= 1, got 2.5"),
        ([*PREDICT, "--device", "gpu0"], "argument --device: expected auto, cpu, cuda or cuda:N, got gpu0"),
        ([*EXTRACT, "--train-flip", "1.5"], "argument --train-flip: expected a number in [0, 1]"),
        ([*EXTRACT, "--train-views", "-2"], "argument --train-views: expected an integer >= 0"),
        ([*EXTRACT, "--decode-threads", "0"], "argument --decode-threads: expected an integer >= 1"),
        ([*EXTRACT, "--shard-clips", "0"], "argument --shard-clips: expected an integer >= 1"),
        ([*EXTRACT, "--train-views-seed", "-1"], "argument --train-views-seed: expected an integer >= 0"),
        ([*EXTRACT, "--compression", "zstd:99"], "argument --compression: compression='zstd:99': zstd level"),
        ([*EXTRACT, "--workers", "0"], "argument --workers: expected an integer >= 1, got 0"),
        (["demo", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
        (["demo", "--seed", "-3"], "argument --seed: expected an integer >= 0, got -3"),
        (["sweep", *STORES, "--grid", "g", "--out", "o", "--workers", "-1"], "argument --workers: expected"),
        (
            ["train-heads", *STORES, "--config", "c", "--out", "o", "--memory-budget", "1e400GB"],
            "argument --memory-budget: --memory-budget '1e400GB': must be a finite",
        ),
        (["evaluate", "--store", "s", "--run", "r", "--memory-budget", "-1"], "expected bytes with a unit"),
        (
            [
                "finetune",
                "--dataset",
                "d",
                "--root",
                "r",
                "--config",
                "c",
                "--out",
                "o",
                "--stop-after-steps",
                "0",
            ],
            "argument --stop-after-steps: expected an integer >= 1",
        ),
        (
            ["visualize", "v.mp4", "--config", "c", "--out", "o.png", "--frames", "1"],
            "expected an integer >= 2",
        ),
        (["visualize", "v.mp4", "--config", "c", "--out", "o.png", "--fps", "0"], "in (0, 100]"),
    ],
)
def test_out_of_range_options_are_refused_when_parsed(capsys, argv, message):
    assert message in parse_error(capsys, argv)


def test_stride_needs_window_and_the_windows_are_bounded_before_decoding(capsys):
    from stage2_temporal.inference.timeline import MAX_WINDOWS, window_starts

    assert "--stride needs --window" in parse_error(capsys, [*PREDICT, "--stride", "1"])
    # the case: a 120 s video, 4 s windows every 1 ms
    with pytest.raises(ValueError, match=r"--stride 0.001: 116,001 windows of 4 s over 120.0 s") as e:
        window_starts(120.0, 4.0, 0.001)
    assert f"more than {MAX_WINDOWS:,}" in str(e.value) and "at least 0.0117 s" in str(e.value)
    assert len(window_starts(120.0, 4.0, 0.0117)) <= MAX_WINDOWS  # the suggested stride is allowed
    np.testing.assert_allclose(window_starts(10.0, 4.0, 2.0), [0, 2, 4, 6])


def test_the_top_k_csv_of_a_four_class_run_has_a_header_for_four(tmp_path):
    from stage2_temporal.inference.predict import VideoPrediction, write_top_k_csv

    names = ["a", "b", "c", "d"]
    preds = [VideoPrediction("x.mp4", np.array([0.1, 0.6, 0.2, 0.1])), VideoPrediction("y.mp4", error="bad")]
    with write_top_k_csv(preds, names, tmp_path / "p.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video", "label1", "prob1", "label2", "prob2", "label3", "prob3", "label4", "prob4"]
    assert len(rows) == 2 and len(rows[1]) == len(rows[0])
    assert rows[1][:5] == ["x.mp4", "b", "0.600000", "c", "0.200000"]


def test_training_views_are_refused_for_a_validation_split_and_store(tmp_path, capsys):
    from stage1_extract.videos.synthetic import make_folder_dataset
    from stage2_temporal.training.synthetic import synthetic_cache, write_store

    videos = tmp_path / "videos"
    make_folder_dataset(videos, ["left", "right"], {"val": 1}, 32, 4, seed=0)
    out = tmp_path / "val.zarr"
    argv = ["extract", "--dataset", "folder", "--root", str(videos), "--split", "val", "--train-views", "2"]
    argv += ["--config", "configs/models/amflow_tiny.yaml", "--out", str(out), "model.backbone.img_size=32"]
    assert "--train-views 2: augmented training views are for the train split" in parse_error(capsys, argv)
    assert not out.exists()
    # a store made so before this check is refused where it would score a run
    fields = {"model": "synthetic", "frames": 4}
    cache = synthetic_cache(16, seed=0, flow_blocks=0)
    write_store(cache, tmp_path / "train.zarr", fields)
    write_store(dataclasses.replace(cache), out, fields, provenance={"train_views": {"views": 2}})
    argv = ["train-heads", "--store", str(tmp_path / "train.zarr"), "--val-store", str(out)]
    argv += ["--config", "configs/heads/tiny.yaml", "--out", str(tmp_path / "run"), "--quiet"]
    line = parse_error(capsys, argv)
    assert f"validation store {out}: holds 2 augmented training views per clip" in line
    assert not (tmp_path / "run").exists()


def test_inputs_are_refused_by_their_content_not_their_name(tmp_path, capsys):
    from stage2_temporal.heads import HEAD_TYPES
    from stage2_temporal.training.run_dir import HeadsInfo, save_heads

    heads = tmp_path / "model.safetensors"  # a run's heads, named like a model file
    info = HeadsInfo(HEAD_TYPES["lstm"][0](hidden=8, layers=1), 3, ["a0"], 8, 8)
    save_heads(info.build(), info, heads)
    line = parse_error(capsys, ["predict", "v.mp4", "--model", str(heads)])
    assert "neither an export (amflow export) nor a merged ZeroI2V model" in line
    assert "no 'config' in the safetensors metadata" in parse_error(
        capsys, ["merge", str(heads), "--out", str(tmp_path / "m.safetensors")]
    )
    video_named_h5 = tmp_path / "features.h5"
    video_named_h5.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    line = parse_error(capsys, ["store", "import", str(video_named_h5), "--out", str(tmp_path / "s.zarr")])
    assert f"{video_named_h5}: not an HDF5 file" in line
    folder = tmp_path / "looks.zarr"
    folder.mkdir()
    assert "not an amflow feature store" in parse_error(capsys, ["store", "info", str(folder)])


def test_weights_are_read_by_their_content_not_their_suffix(tmp_path):
    import torch
    from safetensors.torch import save_file

    from stage1_extract.families.backbone import WeightsError, read_state_dict

    renamed = tmp_path / "weights.pth"  # a safetensors file under a pickle's name
    save_file({"w": torch.arange(3.0)}, str(renamed))
    assert torch.equal(read_state_dict(renamed)["w"], torch.arange(3.0))
    pickled = (
        tmp_path / "weights.safetensors"
    )  # and a pickle under a safetensors name: refused, not unpickled
    torch.save({"w": torch.arange(3.0)}, pickled)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_state_dict(pickled)

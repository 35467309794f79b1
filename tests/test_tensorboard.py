"""TensorBoard event files of train-heads, sweep and finetune, read back with tensorboard's own
EventAccumulator and compared with the curve.csv each run writes; --no-tensorboard writes none."""

import csv

import pytest
import yaml

from amflow.cli import main
from stage2_temporal.training.synthetic import synthetic_cache, write_store

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

HEADS = ["heads.hidden=8", "heads.flow_embed=8", "heads.flow_hidden=8", "epochs=3", "patience=null"]


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def curve(run_dir):
    with (run_dir / "curve.csv").open() as f:
        return list(csv.DictReader(f))


def assert_matches_curve(run_dir, columns):
    logged, rows = scalars(run_dir), curve(run_dir)
    for column, tag in columns.items():
        expected = [(int(r["epoch"]), float(r[column])) for r in rows]
        assert [s for s, _ in logged[tag]] == [s for s, _ in expected], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in expected], rel=1e-6), tag


COLUMNS = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "val_mean_class_acc": "val/mean_class_acc",
    "val_top1": "val/top1",
    "lr": "lr",
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    write_store(synthetic_cache(48, seed=0), tmp / "train.zarr", {"model": "tiny"})
    write_store(synthetic_cache(24, seed=1), tmp / "val.zarr", {"model": "tiny"})
    return tmp / "train.zarr", tmp / "val.zarr"


def test_train_heads_and_sweep_write_events(stores, tmp_path):
    train, val = stores
    base = ["--store", str(train), "--val-store", str(val), "--quiet"]
    run = tmp_path / "run"
    assert main(["train-heads", *base, "--config", "configs/heads/tiny.yaml", "--out", str(run), *HEADS]) == 0
    assert_matches_curve(run, COLUMNS)
    # a retrained run replaces its events instead of adding a second curve
    assert (
        main(
            [
                "train-heads",
                *base,
                "--config",
                "configs/heads/tiny.yaml",
                "--out",
                str(run),
                "--overwrite",
                *HEADS,
            ]
        )
        == 0
    )
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert_matches_curve(run, COLUMNS)
    off = tmp_path / "off"
    argv = [
        "train-heads",
        *base,
        "--config",
        "configs/heads/tiny.yaml",
        "--out",
        str(off),
        "--no-tensorboard",
    ]
    assert main([*argv, *HEADS]) == 0
    assert (off / "curve.csv").is_file() and not list(off.glob("events.out.tfevents.*"))

    fixed = {"epochs": 2, "heads.hidden": 8, "heads.flow_embed": 8, "heads.flow_hidden": 8, "patience": None}
    grid = {"base": "heads/tiny.yaml", "fixed": fixed, "grid": {"lr": [1e-3, 1e-2]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    sweep = ["sweep", *base, "--grid", str(tmp_path / "grid.yaml"), "--workers", "0"]
    assert main([*sweep, "--out", str(tmp_path / "sweep")]) == 0
    runs = sorted((tmp_path / "sweep" / "runs").iterdir())
    assert len(runs) == 2
    for r in runs:
        assert_matches_curve(r, COLUMNS)
    assert main([*sweep, "--out", str(tmp_path / "quiet_sweep"), "--no-tensorboard"]) == 0
    assert not list((tmp_path / "quiet_sweep").rglob("events.out.tfevents.*"))


def test_finetune_writes_events(tmp_path):
    from stage1_extract.videos.synthetic import make_folder_dataset

    videos = tmp_path / "videos"
    make_folder_dataset(videos, ["left", "right"], {"train": 4, "val": 2}, 32, 8, seed=2)
    run = tmp_path / "run"
    argv = [
        "finetune",
        "--dataset",
        "folder",
        "--root",
        str(videos),
        "--config",
        "configs/models/zeroi2v_tiny.yaml",
    ]
    argv += ["--recipe", "configs/finetune/tiny.yaml", "--out", str(run), "--quiet", "epochs=2"]
    argv += [
        "model.backbone.img_size=32",
        "model.backbone.timm_kwargs.depth=2",
        "num_frames=4",
        "model.num_classes=2",
    ]
    assert main(argv) == 0
    assert_matches_curve(run, COLUMNS)
    assert len(scalars(run)["val/top1"]) == 2

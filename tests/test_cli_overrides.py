"""One override story on every command: data./model./train. prefixes, bare keys where unambiguous."""

import json
from dataclasses import dataclass, field

import pytest

from amflow.cli import main
from foundation.config import ConfigError, load_config, route_overrides
from stage1_extract.videos.synthetic import make_folder_dataset

TINY = "configs/models/amflow_tiny.yaml"


@dataclass
class Data:
    name: str = "folder"
    num_frames: int = 8
    num_crops: int = 1


@dataclass
class Inner:
    hidden: int = 4


@dataclass
class Model:
    num_frames: int = 8
    bottleneck: int = 16
    seed: int = 0
    heads: Inner = field(default_factory=Inner)


@dataclass
class Train:
    lr: float = 1e-3
    seed: int = 0


SECTIONS = {"data": Data, "model": Model, "train": Train}


def test_prefixes_and_unambiguous_bare_keys_route_to_their_config():
    routed = route_overrides(
        ["model.seed=1", "data.num_crops=3", "train.lr=0.1", "bottleneck=8", "heads.hidden=2", "lr=0.2"],
        SECTIONS,
    )
    assert routed == {
        "data": ["num_crops=3"],
        "model": ["seed=1", "bottleneck=8", "heads.hidden=2"],
        "train": ["lr=0.1", "lr=0.2"],
    }
    # The value is passed on untouched, '=' and all.
    assert route_overrides(["model.heads={hidden: 2}", "name=a=b"], SECTIONS)["model"] == [
        "heads={hidden: 2}"
    ]
    # The frame count must agree between dataset and model: a bare one sets both.
    assert route_overrides(["num_frames=16"], SECTIONS) == {
        "data": ["num_frames=16"],
        "model": ["num_frames=16"],
        "train": [],
    }
    assert route_overrides(["data.num_frames=16"], SECTIONS)["model"] == []


def test_ambiguous_unknown_and_missing_prefix_are_one_line_errors():
    ambiguous = r"key 'seed' is in the model and train configs; write model\.seed=1 or train\.seed=1$"
    with pytest.raises(ConfigError, match=ambiguous):
        route_overrides(["seed=1"], SECTIONS)
    unknown = r"no config of this command has the key 'botleneck' \(prefixes: data\., model\., train\.\); "
    with pytest.raises(ConfigError, match=unknown + r"did you mean model\.bottleneck\?$"):
        route_overrides(["botleneck=8"], SECTIONS)
    with pytest.raises(ConfigError, match=r"key 'train' \(prefixes: data\., model\.\)"):
        route_overrides(["train.lr=1"], {"data": Data, "model": Model})
    with pytest.raises(ConfigError, match="expected key=value"):
        route_overrides(["lr"], SECTIONS)
    # With one config, a bare key and its prefixed form are the same override.
    single = {"model": Model}
    assert route_overrides(["seed=3"], single) == route_overrides(["model.seed=3"], single)


def test_train_heads_config_loads_the_same_bare_or_prefixed():
    from stage2_temporal.training.config import TrainConfig

    sections = {"train": TrainConfig}
    bare = route_overrides(["heads.hidden=8", "lr=0.01"], sections)["train"]
    prefixed = route_overrides(["train.heads.hidden=8", "train.lr=0.01"], sections)["train"]
    a, b = (load_config(TrainConfig, "configs/heads/tiny.yaml", o) for o in (bare, prefixed))
    assert a == b and a.heads.hidden == 8 and a.lr == 0.01


def model_info(capsys, *overrides):
    capsys.readouterr()
    assert main(["model-info", "--config", TINY, "--json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_model_info_bare_and_prefixed_keys_mean_the_same(capsys):
    default = model_info(capsys)
    bare = model_info(capsys, "bottleneck=8")
    assert bare == model_info(capsys, "model.bottleneck=8")
    assert bare["trainable"] < default["trainable"]  # the override took effect


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_model_info_unknown_key_exits_2_naming_it(capsys):
    capsys.readouterr()
    assert main(["model-info", "--config", TINY, "data.num_frames=4"]) == 2
    assert error_line(capsys).startswith("amflow model-info: error: override 'data.num_frames=4'")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """3 classes, one 4-frame 32 px clip per class and split."""
    root = tmp_path_factory.mktemp("videos")
    make_folder_dataset(root, ["left", "right", "up"], {"train": 1, "val": 1}, 32, 4, seed=0)
    return root


def extract(videos, out, *overrides):
    args = ["extract", "--dataset", "folder", "--root", str(videos), "--split", "train", "--config", TINY]
    return main([*args, "--out", str(out), "--decode-workers", "0", *overrides])


def test_extract_reports_a_model_frame_count_that_differs_from_the_dataset(videos, tmp_path, capsys):
    capsys.readouterr()
    assert extract(videos, tmp_path / "s.zarr", "data.num_frames=4") == 2
    line = error_line(capsys)
    assert "amflow_tiny.yaml: num_frames=8 but dataset 'folder' samples num_frames=4" in line
    assert "model.num_frames=4" in line
    assert not (tmp_path / "s.zarr").exists()  # nothing written
    assert extract(videos, tmp_path / "s.zarr", "seed=1", "num_crops=2") == 2  # seed: model only, fine
    assert "num_crops" in error_line(capsys)  # folder takes 1 crop: the bare key reached the dataset


def finetune(videos, out, *overrides):
    args = ["finetune", "--dataset", "folder", "--root", str(videos), "--config", TINY, "--out", str(out)]
    return main([*args, "--recipe", "configs/finetune/tiny.yaml", "--quiet", *overrides])


def test_finetune_reports_disagreements_and_ambiguous_keys(videos, tmp_path, capsys):
    capsys.readouterr()
    assert finetune(videos, tmp_path / "a", "seed=1") == 2
    assert error_line(capsys).endswith(
        "key 'seed' is in the model and train configs; write model.seed=1 or train.seed=1"
    )
    # the class count comes from the dataset (the tiny config says 4): only an override can contradict it
    assert finetune(videos, tmp_path / "a", "num_frames=4", "model.num_classes=4") == 2
    line = error_line(capsys)
    assert "model.num_classes=4 but folder split 'train' has 3 classes" in line
    assert finetune(videos, tmp_path / "a", "data.num_frames=4") == 2
    assert "num_frames=8 but dataset 'folder' samples num_frames=4" in error_line(capsys)
    assert not (tmp_path / "a").exists()


def test_merge_user_error_exits_2(tmp_path, capsys):
    capsys.readouterr()
    assert (
        main(["merge", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.safetensors")]) == 2
    )
    assert error_line(capsys).startswith("amflow merge: error: ")


def test_sweep_overrides_are_fixed_for_every_run_and_may_not_touch_the_grid(tmp_path, capsys):
    from stage2_temporal.sweeps.sweep import expand_grid, load_grid, with_overrides

    grid = load_grid("configs/sweeps/tiny.yaml")  # sweeps heads.type, lr, heads.flow_maps
    plain = expand_grid(grid, tmp_path)
    runs = expand_grid(with_overrides(grid, ["epochs=3", "train.heads.hidden=8"]), tmp_path)
    assert len(runs) == len(plain) == 8
    assert {(r.config.epochs, r.config.heads.hidden) for r in runs} == {(3, 8)}
    assert {r.combination["lr"] for r in runs} == {0.003, 0.001}  # the grid itself is unchanged
    with pytest.raises(ConfigError, match=r"sweeps 'lr'; change its grid instead"):
        with_overrides(grid, ["train.lr=0.1"], "tiny.yaml")
    argv = ["sweep", "--store", "a.zarr", "--val-store", "b.zarr", "--grid", "configs/sweeps/tiny.yaml"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "s"), "data.num_frames=4"]) == 2
    assert "override 'data.num_frames=4': no config of this command has the key 'data'" in error_line(capsys)

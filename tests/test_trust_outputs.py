"""Issue 21 §1, never destroy what exists: every output path of every command is checked (exists, writable,
distinct from every input and every other output) before any work, and a refusal leaves the disk as it
was (``store.outputs.check_outputs``, registered for every command by ``options.with_paths``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from amflow.cli import build_parser, main
from store.outputs import Input, Output, OutputError, check_outputs

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

TINY_ZI2V = "configs/models/zeroi2v_tiny.yaml"
SMALL = ["backbone.img_size=32", "backbone.timm_kwargs.depth=2", "num_classes=3"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): what 'the disk as it was' means."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(capsys, argv: list, expected: str, root: Path) -> None:
    """The command exits 2 with one line containing ``expected``, and nothing under ``root`` changed."""
    before = snapshot(root)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("WARNING", "INFO"))]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert err[0].startswith(f"amflow {argv[0]}")
    assert snapshot(root) == before


# ------------------------------------------------------------------------------------- the one mechanism


def test_check_outputs_refuses_each_kind_of_collision(tmp_path):
    existing = tmp_path / "a.csv"
    existing.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "heads.safetensors").write_text("heads")
    check_outputs([Output("--out", tmp_path / "new" / "deep" / "b.csv")])  # folders are made later
    check_outputs([Output("--out", existing, replace=True)])
    check_outputs([Output("--out", run, resumable=True, folder=True)])
    check_outputs([Output("--out", run / "new.safetensors")], [Input("RUN", run)])  # a new file in the run
    check_outputs([Output("--out", run, resumable=True, folder=True)], [Input("--root", tmp_path)])  # resumed
    check_outputs([Output("--out", "s3://bucket/x.zarr", folder=True)], [Input("--store", "s3://bucket/y")])
    cases = [
        ([Output("--out", existing)], [], "--out " + str(existing) + ": exists (pass --overwrite"),
        ([Output("--out", existing / "x.csv")], [], "is a file, not a folder"),
        ([Output("--out", run)], [], "is a folder; give a file name"),
        ([Output("--out", existing, folder=True, resumable=True)], [], "is a file, not a folder"),
        ([Output("--out", existing, replace=True)], [Input("--in", existing)], "is also the input --in"),
        (
            [Output("--out", run / "heads.safetensors", replace=True)],
            [Input("RUN", run)],
            "would replace a file of the input RUN",
        ),
        ([Output("--out", tmp_path, replace=True, folder=True)], [Input("RUN", run)], "holds the input RUN"),
        ([Output("--a", tmp_path / "x"), Output("--b", tmp_path / "." / "x")], [], "--b"),
        ([Output("--a", "s3://b/x/"), Output("--b", "s3://b/x")], [], "the same file"),
        (
            [Output("--out", "s3://b/x", folder=True, replace=True)],
            [Input("--in", "s3://b/x")],
            "also the input",
        ),
    ]
    for outputs, inputs, message in cases:
        with pytest.raises(OutputError, match=None) as e:
            check_outputs(outputs, inputs)
        assert message in str(e.value) and "\n" not in str(e.value)
    link = tmp_path / "link.csv"
    link.symlink_to(existing)
    with pytest.raises(OutputError, match="is also the input"):
        check_outputs([Output("--out", link, replace=True)], [Input("--in", existing)])
    hard = tmp_path / "hard.csv"
    os.link(existing, hard)
    with pytest.raises(OutputError, match="the same file"):
        check_outputs([Output("--a", hard, replace=True), Output("--b", existing, replace=True)])
    assert existing.read_text() == "keep"


def leaves(parser: argparse.ArgumentParser, name: str, func=None):
    func = parser.get_default("func") or func
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name, func
    for action in subs:
        for child, sub in action.choices.items():
            yield from leaves(sub, f"{name} {child}", func)


def test_every_command_declares_what_it_writes():
    found = dict(leaves(build_parser(), "amflow"))
    assert len(found) >= 18 and "amflow store import" in found and "amflow merge" in found
    undeclared = [name for name, func in found.items() if not callable(getattr(func, "paths", None))]
    assert not undeclared, f"commands without a path plan (options.with_paths): {undeclared}"


# ----------------------------------------------------------------------------------- the listed cases


@pytest.fixture(scope="module")
def zeroi2v_checkpoint(tmp_path_factory):
    """A trainable ZeroI2V checkpoint (what finetune writes and merge reads), 3 classes, 32 px."""
    from foundation.config import load_config
    from stage1_extract.methods.checkpoint import save_trainable_checkpoint
    from stage2_temporal.zeroi2v.model import ZeroI2VConfig, build_zeroi2v

    cfg = load_config(ZeroI2VConfig, TINY_ZI2V, SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    save_trainable_checkpoint(build_zeroi2v(cfg), cfg, path, {"class_names": json.dumps(["a", "b", "c"])})
    return path


def test_merge_onnx_is_checked_before_merging(zeroi2v_checkpoint, tmp_path, capsys):
    out, onnx = tmp_path / "merged.safetensors", tmp_path / "model.onnx"
    onnx.write_text("an existing graph")
    merge = ["merge", zeroi2v_checkpoint, "--out", out]
    refused(capsys, [*merge, "--onnx", onnx], f"--onnx {onnx}: exists (pass --overwrite", tmp_path)
    refused(capsys, [*merge, "--onnx", out, "--overwrite"], "the same file", tmp_path)
    unwritable = onnx / "model.onnx"  # its folder is a file: nothing can be written there
    refused(capsys, [*merge, "--onnx", unwritable], "is a file, not a folder", tmp_path)
    assert not out.exists()  # nothing merged before the refusal


def test_export_never_replaces_the_run_it_exports(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "heads.safetensors").write_text("the trained heads")
    argv = ["export", run, "--out", run / "heads.safetensors", "--overwrite"]
    refused(capsys, argv, "would replace a file of the input RUN", tmp_path)
    model = tmp_path / "model.safetensors"
    model.write_text("a merged model")
    refused(capsys, ["export", model, "--out", model, "--overwrite"], "is also the input RUN", tmp_path)


def test_evaluate_checks_every_run_before_writing_anything(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from foundation.formats import read_metadata
    from stage2_temporal.training.synthetic import synthetic_cache, write_store

    fields = {"model": "synthetic", "frames": 4}

    def store(path, seed, classes):
        cache = dataclasses.replace(synthetic_cache(16, seed=seed, flow_blocks=0), class_names=classes)
        return write_store(cache, path, fields)

    train = store(tmp_path / "train.zarr", 0, list("abcd"))
    a, b = tmp_path / "A", tmp_path / "B"
    argv = ["train-heads", "--store", train, "--val-store", train, "--config", "configs/heads/tiny.yaml"]
    argv += ["--out", a, "--quiet", "heads.flow_maps=false", "heads.hidden=8", "epochs=1"]
    assert main([str(x) for x in argv]) == 0
    shutil.copytree(a, b)  # B: the same heads, trained (as its record says) on classes in another order
    state, meta = load_file(b / "heads.safetensors"), read_metadata(b / "heads.safetensors")
    record = json.loads(meta["amflow_heads"])
    record["class_names"] = list("bacd")
    save_file(state, str(b / "heads.safetensors"), {**meta, "amflow_heads": json.dumps(record)})
    runs = [a, b]
    test = store(tmp_path / "test.zarr", 1, list("abcd"))
    refused(
        capsys, ["evaluate", "--store", test, "--run", runs[0], "--run", runs[1], "--quiet"], "B", tmp_path
    )
    assert not list(runs[0].glob("*_test.*"))
    assert main(["evaluate", "--store", str(test), "--run", str(runs[0]), "--quiet"]) == 0
    assert (runs[0] / "eval_test.json").is_file()
    refused(capsys, ["evaluate", "--store", test, "--run", runs[0]], "exists (pass --overwrite", tmp_path)


def test_extract_refuses_a_bad_checkpoint_before_the_store_exists(tmp_path, capsys):
    from stage1_extract.videos.synthetic import make_folder_dataset

    videos = tmp_path / "videos"
    make_folder_dataset(videos, ["left", "right"], {"train": 1}, 32, 4, seed=0)
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    out = tmp_path / "s.zarr"
    base = ["extract", "--dataset", "folder", "--root", videos, "--split", "train"]
    base += ["--config", "configs/models/amflow_tiny.yaml"]
    small = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]
    refused(capsys, [*base, "--out", out, "--checkpoint", bad, *small], str(bad), tmp_path)
    refused(capsys, [*base, "--out", videos, *small], "is also the input --root", tmp_path)


def test_timelines_of_same_named_videos_get_distinct_files(tmp_path, capsys, monkeypatch):
    from foundation.config import load_config
    from stage1_extract.methods.linear_adapters import merge_linear_adapters
    from stage1_extract.videos.synthetic import make_motion_clip, write_video
    from stage2_temporal.inference.timeline import timeline_paths
    from stage2_temporal.zeroi2v.model import ZeroI2VConfig, build_zeroi2v, save_merged

    model = build_zeroi2v(load_config(ZeroI2VConfig, TINY_ZI2V, SMALL))
    merge_linear_adapters(model.vit)
    merged = tmp_path / "merged.safetensors"
    save_merged(model, merged)
    rng = np.random.default_rng(0)
    for folder, motion in (("a", "left"), ("b", "up")):
        (tmp_path / folder).mkdir()
        write_video(
            tmp_path / folder / "clip.mp4", make_motion_clip(motion, size=32, num_frames=12, rng=rng), fps=12
        )
    monkeypatch.chdir(tmp_path)
    argv = [
        "predict",
        "a",
        "b",
        "--model",
        str(merged),
        "--window",
        "0.5",
        "--decode-workers",
        "0",
        "--quiet",
    ]
    assert main([*argv, "--device", "cpu"]) == 0
    timelines = {p: p.read_text() for p in (Path("a_clip_timeline.csv"), Path("b_clip_timeline.csv"))}
    assert "a/clip.mp4" in timelines[Path("a_clip_timeline.csv")]
    assert "b/clip.mp4" in timelines[Path("b_clip_timeline.csv")]
    assert Path("a_clip_timeline.png").is_file() and Path("b_clip_timeline.png").is_file()
    refused(capsys, [*argv, "--device", "cpu"], "a_clip_timeline.csv: exists (pass --overwrite", tmp_path)
    assert timeline_paths(["x/clip.mp4", "y/z/clip.avi", "other.mp4"]) == [
        Path("x_clip_timeline.csv"),
        Path("y_z_clip_timeline.csv"),
        Path("other_timeline.csv"),
    ]


# ------------------------------------------------------------------------------- more of the same kind


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["store", "export", "{d}/s.zarr", "--h5", "{d}/s.zarr", "--overwrite"], "is a folder"),
        (["store", "export", "{d}/s.zarr", "--h5", "{d}/old.h5"], "exists (pass --overwrite"),
        (["store", "import", "{d}/s.zarr/x.h5", "--out", "{d}/s.zarr", "--overwrite"], "holds the input"),
        (
            [
                "train-heads",
                "--store",
                "{d}/s.zarr",
                "--val-store",
                "{d}/v.zarr",
                "--config",
                "c.yaml",
                "--out",
                "{d}/s.zarr",
            ],
            "is also the input --store",
        ),  # fmt: skip
        (
            [
                "sweep",
                "--store",
                "{d}/s.zarr",
                "--val-store",
                "{d}/v.zarr",
                "--grid",
                "{d}/old.h5",
                "--out",
                "{d}/v.zarr",
            ],
            "is also the input --val-store",
        ),  # fmt: skip
        (
            ["predict", "{d}/clip.mp4", "--model", "{d}/m.st", "--out", "{d}/clip.mp4", "--overwrite"],
            "is also the input VIDEO",
        ),  # fmt: skip
        (["visualize", "{d}/clip.mp4", "--config", "c.yaml", "--out", "{d}/old.png"], "exists (pass"),
        (["visualize", "{d}/clip.mp4", "--config", "c.yaml", "--out", "{d}/f.png", "--gif"], "--gif"),
        (
            ["convert", "{d}/r.pth", "--config", "c.yaml", "--out", "{d}/o.st", "--backbone-out", "{d}/o.st"],
            "the same file",
        ),  # fmt: skip
        (
            ["convert", "{d}/r.pth", "--config", "c.yaml", "--out", "{d}/r.pth", "--overwrite"],
            "also the input",
        ),
        (
            ["finetune", "--dataset", "folder", "--root", "{d}", "--config", "c.yaml", "--out", "{d}/old.h5"],
            "is a file, not a folder",
        ),  # fmt: skip
        (["demo", "--out", "{d}/old.h5"], "is a file, not a folder"),
    ],
)
def test_outputs_of_every_command_are_checked_before_any_work(tmp_path, capsys, argv, expected):
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "s.zarr" / "x.h5").write_text("h5")
    (tmp_path / "v.zarr").mkdir()
    for name in ("old.h5", "old.png", "clip.mp4", "m.st", "r.pth", "f.gif"):
        (tmp_path / name).write_text(name)
    refused(capsys, [a.format(d=tmp_path) for a in argv], expected, tmp_path)

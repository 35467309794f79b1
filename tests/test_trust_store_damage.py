"""A store's damage is always found and repairable by the documented route (issue 21 s3).

For every kind of damage: ``store verify`` names it, ``extract`` never calls the damaged store complete and
stage 2 refuses it, each in one line; ``store repair`` then the same ``extract`` command end in a store that
verifies and holds the values of an undamaged extraction, or repair says in one line what cannot be
repaired and what to do.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from amflow.cli import main
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.training.checks import check_store_usable
from stage2_temporal.training.synthetic import synthetic_cache, write_store
from store import FeatureStore, verify_store
from store.repair import find_damage, repair_store

pytestmark = pytest.mark.filterwarnings("ignore:.*randomly initialised")

TINY = "configs/models/amflow_tiny.yaml"
SMALL = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, command: str) -> str:
    lines = [
        line
        for line in err.strip().splitlines()
        if not line.startswith(("WARNING", "INFO")) and not re.match(r"^[\w ]+:\s+\d+%\|", line)
    ]
    assert len(lines) == 1 and lines[0].startswith(f"amflow {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Videos and an undamaged extraction of them (3 shards of 2 clips)."""
    root = tmp_path_factory.mktemp("damage")
    make_folder_dataset(root / "videos", ["left", "right"], {"train": 3}, 32, 6, seed=0)
    code = main(extract_argv(root / "videos", root / "clean.zarr"))
    assert code == 0
    return root / "videos", root / "clean.zarr"


def extract_argv(videos: Path, out: Path) -> list[str]:
    args = ["extract", "--dataset", "folder", "--root", videos, "--split", "train", "--config", TINY]
    return [str(a) for a in (*args, "--out", out, "--decode-workers", "0", "--shard-clips", "2", *SMALL)]


def values(path: Path) -> dict[str, np.ndarray]:
    st = FeatureStore.open(path)
    return {n: np.asarray(st.array(n)[:]) for n in (*st.data_arrays, "labels", "status")}


def test_verify_repair_extract_mends_status_labels_metadata_and_a_deleted_chunk(clean, tmp_path, capsys):
    videos, clean_store = clean
    path = tmp_path / "s.zarr"
    shutil.copytree(clean_store, path)
    with open(path / "status" / "c.1", "r+b") as f:  # clip 2's status byte becomes 7
        f.write(b"\x07")
    with open(path / "labels" / "c" / "0", "r+b") as f:  # the labels chunk: Zstd cannot decode it
        f.seek(4)
        f.write(b"garbage")
    (path / "embeddings" / "zarr.json").write_text("{broken")
    (path / "cls" / "c.2.0.0").unlink()  # clips 4, 5 are done but their cls shard file is gone

    code, _, err = run_cli(capsys, "store", "verify", path, "--quiet")
    assert code == 1 and "Traceback" not in err
    assert "status: invalid value(s) [7] at clip(s) 2 (train/left/left_0002.mp4)" in err
    assert "labels: unreadable chunk (RuntimeError('Zstd decompression error" in err
    assert "embeddings/zarr.json: unreadable (JSONDecodeError" in err
    assert "cls: cls/c.2.0.0 missing (2 done clip(s))" in err

    # Stage 2 and export refuse it, in one line naming the route.
    code, _, err = run_cli(capsys, "store", "export", path, "--h5", tmp_path / "s.h5", "--quiet")
    assert (
        code == 2
        and "damaged store: " in error_line(err, "store export")
        and not (tmp_path / "s.h5").exists()
    )
    with pytest.raises(ValueError, match=r"damaged store: .* \(and 2 more\); run `amflow store repair"):
        check_store_usable(path)
    # repair mends what it can; the labels come from the dataset: it leaves them to extract, saying so.
    code, out, err = run_cli(capsys, "store", "repair", path, "--quiet")
    assert code == 0, err
    assert "rebuilt embeddings/zarr.json from the store's layout" in out
    assert "3 damaged clip(s) marked missing: 2 (train/left/left_0002.mp4), 4 (" in out
    assert "labels: unreadable chunk" in err and "the same `amflow extract` command rewrites it" in err

    code, out, _ = run_cli(capsys, *extract_argv(videos, path))
    assert code == 0 and "processed this run      3" in out
    assert verify_store(path, progress=False) == []
    for name, value in values(clean_store).items():
        assert np.array_equal(values(path)[name], value, equal_nan=True), name


def test_a_damaged_clip_table_is_named_as_not_repairable(clean, tmp_path, capsys):
    videos, clean_store = clean
    path = tmp_path / "ids.zarr"
    shutil.copytree(clean_store, path)
    with open(path / "clip_ids" / "c" / "0", "r+b") as f:
        f.seek(4)
        f.write(b"garbage")
    code, _, err = run_cli(capsys, "store", "verify", path, "--quiet")
    assert code == 1 and "clip_ids: unreadable chunk" in err
    code, _, err = run_cli(capsys, "store", "repair", path, "--quiet")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "cannot be repaired: extract into a new store" in lines[0]
    code, _, err = run_cli(capsys, *extract_argv(videos, path))
    assert code == 2 and "extract into a new store" in error_line(err, "extract")


def synthetic(path: Path) -> Path:
    """24 clips in 3 shards of 8, two of them failed (clips 9, 17), written without extraction."""
    path = write_store(synthetic_cache(24, seed=0, flow_blocks=0), path, {"m": 1}, shard_clips=8)
    with FeatureStore.open(path, mode="r+").shard_writer(1) as w:
        w.fail(9, "DecodeError", "bad video")
    with FeatureStore.open(path, mode="r+").shard_writer(2) as w:
        w.fail(17, "DecodeError", "bad video")
    return path


DAMAGE = {
    # name: (how, what verify names, clips repair hands back to extraction)
    "status file truncated": (lambda p: (p / "status/c.1").write_bytes(b"\x01"), "status/c.1 unreadable", []),
    "status metadata deleted": (lambda p: (p / "status/zarr.json").unlink(), "status/zarr.json", []),
    "status byte 255": (lambda p: _poke(p / "status/c.0", 3, b"\xff"), "invalid value(s) [-1]", [3]),
    "embeddings file too long": (
        lambda p: _append(p / "embeddings/c.2.0.0.0.0", b"\0" * 8),
        "embeddings/c.2.0.0.0.0 has",
        [16, 18, 19, 20, 21, 22, 23],
    ),
    "cls metadata of another shape": (
        lambda p: _edit(p / "cls/zarr.json", '"shape": [\n    24,', '"shape": [\n    25,'),
        "cls/zarr.json: does not match the store's layout: shape (25",
        [],
    ),
    "failure texts unreadable": (
        lambda p: (p / "failure_type/c.1").write_bytes(b"\0\1"),
        "failure_type: failure_type/c.1 unreadable",
        [9],
    ),
    "labels metadata broken": (lambda p: (p / "labels/zarr.json").write_text("[]"), "labels/zarr.json", []),
}


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_each_kind_of_damage_is_found_and_repaired(case, tmp_path):
    damage, named, redo = DAMAGE[case]
    path = synthetic(tmp_path / "s.zarr")
    before = values(path)
    damage(path)
    st = FeatureStore.open(path)
    found = find_damage(st)  # the cheap check extract and stage 2 run
    assert any(named in d.line for d in found), [d.line for d in found]
    assert any(named in p for p in verify_store(path, progress=False))
    report = repair_store(path)
    assert report.redo == redo and not report.left
    assert verify_store(path, progress=False) == []
    after = values(path)
    kept = np.setdiff1d(np.arange(24), redo)
    status_lost = case == "status file truncated"  # shard 1's clips read as missing: extract redoes them
    for name in ("embeddings", "cls", "labels"):
        assert np.array_equal(after[name][kept], before[name][kept], equal_nan=True), name
    expected = before["status"].copy()
    expected[redo] = 0
    if status_lost:
        expected[8:16] = 0
    assert np.array_equal(after["status"], expected)


def test_extract_never_calls_a_damaged_store_complete(clean, tmp_path, capsys):
    videos, clean_store = clean
    path = tmp_path / "s.zarr"
    shutil.copytree(clean_store, path)
    (path / "embeddings" / "c.1.0.0.0.0").unlink()  # clips 2, 3: done, their embeddings gone
    code, _, err = run_cli(capsys, *extract_argv(videos, path))
    line = error_line(err, "extract")
    assert code == 2 and "embeddings/c.1.0.0.0.0 missing (2 done clip(s))" in line
    assert f"run `amflow store repair {path}`, then the same `amflow extract` command" in line
    code, _, err = run_cli(capsys, "store", "verify", path, "--quiet")
    assert code == 1 and "embeddings/c.1.0.0.0.0 missing" in err

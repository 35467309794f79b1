"""Clip paths from annotation files never leave ``--root``: one case per release format (UCF101 lists, K400
csv, HMDB51 split files, SSv2 and Diving48 json) with a file really there outside the root, so nothing
but the check keeps it from being decoded; dangling symbolic links are reported, never dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import stage1_extract  # noqa: F401  (first: fixes the torchvision import before anything imports timm)
from amflow.cli import main
from stage1_extract.videos.datasets import build_index
from store.feature_store import FeatureStore

TINY = "configs/models/amflow_tiny.yaml"
FAST = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]


def _put(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


@pytest.fixture
def root(tmp_path, clip_bytes) -> Path:
    """ROOT = tmp/a/root; real videos wait one and two levels above it, where '../..' paths point."""
    _put(tmp_path / "a" / "outside.mp4", clip_bytes)
    _put(tmp_path / "outside.mp4", clip_bytes)
    return tmp_path / "a" / "root"


UCF_LIST = "YoYo/v_1.avi 1\n../../outside.mp4 1\n/etc/passwd 1\n"


def _refused(index) -> list[str]:
    return [r.path for r in index.refused]


def test_ucf101_list_lines_leaving_the_root(root, clip_bytes):
    _put(root / "ucfTrainTestlist" / "classInd.txt", "1 YoYo\n")
    _put(root / "ucfTrainTestlist" / "trainlist01.txt", UCF_LIST)
    _put(root / "YoYo" / "v_1.avi", clip_bytes)  # videos directly in ROOT: the prefix absorbs nothing
    index = build_index("ucf101", root, "train")
    assert [r.path for r in index.records] == ["YoYo/v_1.avi"] and index.missing == []
    assert _refused(index) == ["../../outside.mp4", "/etc/passwd"]


def test_k400_youtube_id_leaving_the_root(root, clip_bytes):
    rows = "label,youtube_id,time_start,time_end,split\nyoga,ok,0,10,train\nyoga,../../evil,0,10,train\n"
    _put(root / "annotations" / "train.csv", rows)
    _put(root / "train" / "ok_000000_000010.mp4", clip_bytes)
    _put(root / "train" / "evil_000000_000010.mp4", clip_bytes)  # same file name: not taken for it either
    _put(root / "evil_000000_000010.mp4", clip_bytes)  # where train/../../evil would point
    index = build_index("k400", root, "train")
    assert [r.path for r in index.records] == ["train/ok_000000_000010.mp4"]
    assert _refused(index) == ["train/../../evil_000000_000010.mp4"]


def test_hmdb51_split_lines_leaving_the_root(root, clip_bytes):
    _put(root / "testTrainMulti_7030_splits" / "wave_test_split1.txt",
         "a.avi 1 \n../../../outside.mp4 1 \n/etc/passwd 1 \n")  # fmt: skip
    _put(root / "wave" / "a.avi", clip_bytes)
    index = build_index("hmdb51", root, "train")
    assert [r.path for r in index.records] == ["wave/a.avi"]
    assert _refused(index) == ["../../outside.mp4", "/etc/passwd"]  # one spelling: wave/../../../ normalised


def test_ssv2_and_diving48_ids_leaving_the_root(root, clip_bytes):
    _put(root / "labels" / "labels.json", json.dumps({"Waving": "0"}))
    _put(root / "labels" / "train.json", json.dumps([{"id": "../../../outside", "template": "Waving"}]))
    (root / "20bn-something-something-v2").mkdir()
    expected = ["20bn-something-something-v2/../../../outside.webm"]
    assert _refused(build_index("ssv2", root, "train")) == expected
    entries = [{"vid_name": "../../../outside", "label": 0}, {"vid_name": "/etc/passwd", "label": 1}]
    _put(root / "Diving48_V2_train.json", json.dumps(entries))
    (root / "rgb").mkdir()
    index = build_index("diving48", root, "train")
    assert index.records == [] and _refused(index) == ["/etc/passwd.mp4", "rgb/../../../outside.mp4"]


def test_extract_records_refused_paths_as_failed_and_never_decodes_them(root, clip_bytes, tmp_path, capsys):
    _put(root / "ucfTrainTestlist" / "classInd.txt", "1 YoYo\n")
    _put(root / "ucfTrainTestlist" / "trainlist01.txt", UCF_LIST)
    _put(root / "YoYo" / "v_1.avi", clip_bytes)
    common = ["--dataset", "ucf101", "--root", str(root), "--split", "train"]
    assert main(["datasets", "list", *common]) == 0
    out, err = capsys.readouterr()
    assert out == "YoYo/v_1.avi\t0\n"
    assert "2 refused" in err and "refused (absolute or outside the root): /etc/passwd" in err
    store_path = tmp_path / "store.zarr"
    argv = ["extract", *common, "--config", TINY, "--out", str(store_path), "--decode-workers", "0", *FAST]
    assert main(argv) == 0
    store = FeatureStore.open(store_path)
    assert [str(c) for c in store.clip_ids[store.done_mask()]] == ["YoYo/v_1.avi"]
    failures = {f["clip_id"]: f for f in store.failures()}
    assert set(failures) == {"../../outside.mp4", "/etc/passwd"}
    assert {f["error_type"] for f in failures.values()} == {"PathOutsideRoot"}
    assert "leaves the dataset root" in failures["../../outside.mp4"]["message"]
    assert "absolute path" in failures["/etc/passwd"]["message"]


# ------------------------------------------------------------------------------------ dangling symlinks


def test_dangling_symlinks_are_reported_missing(tmp_path, clip_bytes):
    _put(tmp_path / "train" / "cat" / "1.mp4", clip_bytes)
    (tmp_path / "train" / "cat" / "2.mp4").symlink_to(tmp_path / "nowhere.mp4")
    folder = build_index("folder", tmp_path, "train")
    assert [r.path for r in folder.records] == ["train/cat/1.mp4"]
    assert [(r.path, r.label) for r in folder.missing] == [("train/cat/2.mp4", 0)]
    _put(tmp_path / "mp4" / "Walk_p03_r01_v16_c06.mp4", clip_bytes)
    (tmp_path / "mp4" / "Walk_p04_r01_v16_c06.mp4").symlink_to(tmp_path / "nowhere.mp4")
    smarthome = build_index("smarthome", tmp_path, "train")
    assert [r.path for r in smarthome.records] == ["mp4/Walk_p03_r01_v16_c06.mp4"]
    assert [r.path for r in smarthome.missing] == ["mp4/Walk_p04_r01_v16_c06.mp4"]

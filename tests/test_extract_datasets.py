"""``amflow extract --dataset NAME --root DIR --split S --config ... --out STORE.zarr`` for each release
layout, built from tiny generated videos and annotation files in the release's own format: the store
holds exactly the clips and labels ``amflow datasets list`` prints, and those are the hand-written ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from amflow.cli import main
from stage1_extract.videos.datasets import load_dataset_config
from stage1_extract.videos.synthetic import make_motion_clip, write_video
from store.feature_store import FeatureStore

TINY = "configs/models/amflow_tiny.yaml"
FAST = ["model.backbone.timm_kwargs.depth=2", "model.backbone.img_size=32", "num_frames=4"]
Expected = tuple[list[str], list[tuple[str, int]], list[str]]  # first classes, (path, label), absent files


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory) -> bytes:
    """One real 32x32, 8-frame mp4; copied under every name a tree needs (decoders probe the content, so
    the .avi / .webm names of UCF101, HMDB51 and SSv2 decode too)."""
    frames = make_motion_clip("left", size=32, num_frames=8, rng=np.random.default_rng(0))
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames).read_bytes()


def _put(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def ucf101_test(root: Path, clip: bytes) -> Expected:
    """Split 1 test list (no labels: the folder names the class); one listed file is absent."""
    _write(root, "ucfTrainTestlist/classInd.txt", "1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    _write(root, "ucfTrainTestlist/trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    _write(
        root,
        "ucfTrainTestlist/testlist01.txt",
        "YoYo/v_YoYo_g01_c01.avi\nHandstandPushups/v_HandStandPushups_g01_c01.avi\n"
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02.avi\nYoYo/v_YoYo_g02_c01.avi\n",
    )
    for rel in (
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02.avi",
        "HandstandPushups/v_HandStandPushups_g01_c01.avi",
        "YoYo/v_YoYo_g01_c01.avi",
    ):
        _put(root, f"UCF-101/{rel}", clip)
    return (
        ["ApplyEyeMakeup", "HandstandPushups", "YoYo"],
        [
            ("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02.avi", 0),
            ("UCF-101/HandstandPushups/v_HandStandPushups_g01_c01.avi", 1),
            ("UCF-101/YoYo/v_YoYo_g01_c01.avi", 2),
        ],
        ["UCF-101/YoYo/v_YoYo_g02_c01.avi"],
    )


SMARTHOME_FILES = (
    "Walk_p03_r01_v16_c01.mp4",  # CS train (subject 3); CV train (camera 1): Walk
    "Cook.Cleandishes_p04_r00_v02_c03.mp4",  # CS train; camera 3 is not CV1's
    "Drink.Fromcup_p06_r02_v05_c01.mp4",  # CS train; CV1 train
    "Pour.Fromcup_p03_r00_v01_c01.mp4",  # no class in either protocol: skipped
    "Readbook_p02_r00_v01_c01.mp4",  # CS test subject; CV1 train camera
)


def smarthome_cs_train(root: Path, clip: bytes) -> Expected:
    """The release's flat folder as ROOT/mp4/; cross-subject protocol, 31 classes."""
    for name in SMARTHOME_FILES:
        _put(root, f"mp4/{name}", clip)
    classes_cs_head = ["Cook.Cleandishes", "Cook.Cleanup", "Cook.Cut", "Cook.Stir", "Cook.Usestove"]
    return (
        classes_cs_head,
        [
            ("mp4/Cook.Cleandishes_p04_r00_v02_c03.mp4", 0),
            ("mp4/Drink.Fromcup_p06_r02_v05_c01.mp4", 8),
            ("mp4/Walk_p03_r01_v16_c01.mp4", 29),
        ],
        [],
    )


def smarthome_cv1_train(root: Path, clip: bytes) -> Expected:
    """The flat folder as ROOT itself; cross-view protocol 1 (train camera 1), 19 classes."""
    for name in SMARTHOME_FILES:
        _put(root, name, clip)
    return (
        ["Cutbread", "Drink.Frombottle", "Drink.Fromcan", "Drink.Fromcup", "Drink.Fromglass"],
        [
            ("Drink.Fromcup_p06_r02_v05_c01.mp4", 3),
            ("Readbook_p02_r00_v01_c01.mp4", 12),
            ("Walk_p03_r01_v16_c01.mp4", 18),
        ],
        [],
    )


def hmdb51_train(root: Path, clip: bytes) -> Expected:
    _write(root, "testTrainMulti_7030_splits/brush_hair_test_split1.txt", "a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    _write(root, "testTrainMulti_7030_splits/wave_test_split1.txt", "d.avi 1 \ne.avi 2 \n")
    for rel in ("brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "wave/d.avi", "wave/e.avi"):
        _put(root, rel, clip)
    return ["brush_hair", "wave"], [("brush_hair/a.avi", 0), ("wave/d.avi", 1)], []


def k400_val(root: Path, clip: bytes) -> Expected:
    """The release's validation file is ``validate.csv``; indices are the canonical 400 classes'."""
    header = "label,youtube_id,time_start,time_end,split\n"
    _write(root, "annotations/train.csv", header + '"air drumming",t1,0,10,train\n')
    rows = 'abseiling,v_a-b_1,13,23,val\n"zumba",v2,5,15,val\n'
    _write(root, "annotations/validate.csv", header + rows)
    _put(root, "validate/abseiling/v_a-b_1_000013_000023.mp4", clip)  # in a label folder
    _put(root, "validate/v2_000005_000015.mp4", clip)  # flat
    return (
        ["abseiling", "air drumming", "answering questions"],
        [
            ("validate/abseiling/v_a-b_1_000013_000023.mp4", 0),
            ("validate/v2_000005_000015.mp4", 399),
        ],
        [],
    )


def ssv2_validation(root: Path, clip: bytes) -> Expected:
    labels = {"Holding something next to something": "0", "Pushing something from left to right": "1"}
    _write(root, "labels/labels.json", json.dumps(labels))
    entries = [
        {"id": "11", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
        {"id": "12", "label": "holding a pen next to a box",
         "template": "Holding [something] next to [something]", "placeholders": ["a pen", "a box"]},
    ]  # fmt: skip
    _write(root, "labels/validation.json", json.dumps(entries))
    for vid in ("11", "12"):
        _put(root, f"20bn-something-something-v2/{vid}.webm", clip)
    return (
        list(labels),
        [("20bn-something-something-v2/11.webm", 1), ("20bn-something-something-v2/12.webm", 0)],
        [],
    )


def diving48_test(root: Path, clip: bytes) -> Expected:
    entries = [
        {"vid_name": "x_00002", "label": 47, "start_frame": 2, "end_frame": 7},
        {"vid_name": "-mmq0PT-u8k_00155", "label": 3, "start_frame": 0, "end_frame": 8},
    ]
    _write(root, "Diving48_V2_test.json", json.dumps(entries))
    for entry in entries:
        _put(root, f"rgb/{entry['vid_name']}.mp4", clip)
    return ["class_00", "class_01"], [("rgb/-mmq0PT-u8k_00155.mp4", 3), ("rgb/x_00002.mp4", 47)], []


def list_val(root: Path, clip: bytes) -> Expected:
    """mmaction2-style list as a Windows editor saves it (BOM, CRLF, ./ and backslash spellings): a class
    name, an index, a comment; one file absent."""
    _write(root, "classes.txt", "cat\ndog\n")
    lines = "\ufeff# path label\r\nclips\\b.mp4 dog \r\n./clips//a.mp4 0\r\nclips/c.mp4 1\r\n"
    (root / "val.txt").write_bytes(lines.encode("utf-8"))
    _put(root, "clips/a.mp4", clip)
    _put(root, "clips/b.mp4", clip)
    return ["cat", "dog"], [("clips/a.mp4", 0), ("clips/b.mp4", 1)], ["clips/c.mp4"]


CASES: dict[str, tuple[str, str, str | None, Callable[[Path, bytes], Expected]]] = {
    "ucf101": ("ucf101", "test", "1", ucf101_test),
    "smarthome-cs": ("smarthome", "train", None, smarthome_cs_train),
    "smarthome-cv1": ("smarthome", "train", "cv1", smarthome_cv1_train),
    "hmdb51": ("hmdb51", "train", None, hmdb51_train),
    "k400": ("k400", "val", None, k400_val),
    "ssv2": ("ssv2", "validation", None, ssv2_validation),
    "diving48": ("diving48", "test", None, diving48_test),
    "list": ("list", "val", None, list_val),
}


@pytest.mark.parametrize("case", list(CASES))
def test_extract_cli_stores_the_listed_clips(case, tmp_path, clip_bytes, capsys):
    dataset, split, protocol, build = CASES[case]
    root = tmp_path / "data"
    classes_head, expected, absent = build(root, clip_bytes)
    common = ["--dataset", dataset, "--root", str(root), "--split", split]
    common += ["--protocol", protocol] if protocol else []
    assert main(["datasets", "list", *common]) == 0
    listed = [
        (path, int(label))
        for path, label in (line.split("\t") for line in capsys.readouterr().out.splitlines())
    ]
    assert listed == expected

    out = tmp_path / "store.zarr"
    argv = ["extract", *common, "--config", TINY, "--out", str(out), "--decode-workers", "0", *FAST]
    assert main(argv) == 0
    store = FeatureStore.open(out)
    done = store.done_mask()
    stored = [(str(c), int(y)) for c, y in zip(store.clip_ids[done], store.labels[done])]
    assert stored == listed
    assert store.class_names[: len(classes_head)] == classes_head
    # A listed file absent on disk is not listed, and is recorded as a failure that names it.
    failures = store.failures()
    assert [f["clip_id"] for f in failures] == absent and int((~done).sum()) == len(absent)
    assert all(Path(f["clip_id"]).name in f["message"] for f in failures)
    embeddings = store.array("embeddings")[:][done]
    data_cfg = load_dataset_config(dataset)  # K400, SSv2: several clips or crops per video (METHOD.md s6)
    views = data_cfg.num_clips * data_cfg.num_crops
    assert embeddings.shape[:4] == (len(listed), 4, views, 4)  # clips, adapters (2 blocks x 2), views, frames
    assert np.isfinite(embeddings).all() and np.abs(embeddings).sum() > 0

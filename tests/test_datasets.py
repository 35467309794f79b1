"""Dataset readers on tiny trees in each release's real layout, the Smarthome protocols against the
official split lists, the dataset configs, and the ``amflow datasets list`` output."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

import stage1_extract  # noqa: F401  (first: fixes the torchvision import before anything imports timm)
from amflow.cli import main
from foundation.config import ConfigError
from stage1_extract.videos.datasets import (
    DATASETS,
    SMARTHOME_CS_CLASSES,
    SMARTHOME_CV_CLASSES,
    DatasetConfig,
    build_index,
    load_dataset_config,
)

# The official Toyota Smarthome split lists (train/validation/test x CS/CV1/CV2), gzipped, in the repository.
SPLITS_DIR = Path(__file__).resolve().parent / "data" / "smarthome_splits"


def _put(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pairs(index) -> list[tuple[str, int]]:
    return [(r.path, r.label) for r in index.records]


# ------------------------------------------------------------------------------------------- smarthome


def _official(name: str) -> list[str]:
    text = gzip.decompress((SPLITS_DIR / f"{name}.gz").read_bytes()).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smarthome_tree(tmp_path_factory) -> Path:
    """ROOT/mp4/ with an empty file for every clip named in any official list (the release's file set)."""
    root = tmp_path_factory.mktemp("smarthome")
    (root / "mp4").mkdir()
    names = set()
    for f in SPLITS_DIR.glob("*.txt.gz"):
        names.update(_official(f.name.removesuffix(".gz")))
    for name in names:
        (root / "mp4" / name).touch()
    (root / "mp4" / "README.txt").touch()  # not a video: ignored
    return root


@pytest.mark.parametrize("protocol", ["cs", "cv1", "cv2"])
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_smarthome_protocols_reproduce_the_official_lists(smarthome_tree, protocol, split):
    cfg = load_dataset_config("smarthome", [f"protocol={protocol}"])
    index = build_index("smarthome", smarthome_tree, split, cfg)
    official = _official(f"{split}_{protocol.upper()}.txt")
    # The official CS lists also name the 14 clips of Pour.Fromcup, which has no class (METHOD.md 5).
    expected = sorted(n for n in official if not n.startswith("Pour.Fromcup_"))
    names = [r.path for r in index.records]
    assert names == [f"mp4/{n}" for n in expected]
    assert index.missing == []
    if protocol == "cs":
        cut = len(official) - len(expected)
        assert index.skipped == {"activity Pour.Fromcup not in CS classes": cut}
    else:  # clips of the split's cameras whose activity is none of the 19 classes are counted as skipped
        activities = {k.split()[1] for k in index.skipped}
        assert not activities & set(SMARTHOME_CV_CLASSES)
    classes = SMARTHOME_CS_CLASSES if protocol == "cs" else SMARTHOME_CV_CLASSES
    assert index.classes == list(classes)
    for record in index.records[:: max(len(index.records) // 50, 1)]:
        activity = re.sub(r"_p\d+_r\d+_v\d+_c\d+\.mp4$", "", record.path.removeprefix("mp4/"))
        assert index.classes[record.label] == activity


def test_smarthome_cross_subject_counts_match_method(smarthome_tree):
    counts = [
        len(build_index("smarthome", smarthome_tree, s).records) for s in ("train", "validation", "test")
    ]
    assert counts == [8829, 1853, 5433]  # METHOD.md section 5: 16,115 clips
    index = build_index(
        "smarthome", smarthome_tree, "train", load_dataset_config("smarthome", ["protocol=cv1"])
    )
    assert len(index.classes) == 19 and index.classes[18] == "Walk"


def test_smarthome_flat_root_and_odd_names(tmp_path, clip_bytes):
    _put(tmp_path, "Cook.Cleandishes_p02_r00_v02_c03.mp4", clip_bytes)  # CS test, class 0
    _put(tmp_path, "Walk_p03_r01_v16_c06.mp4", clip_bytes)  # CS train, class 29
    _put(tmp_path, "Pour.Fromcup_p03_r00_v01_c01.mp4", clip_bytes)  # train subject, no class
    _put(tmp_path, "holiday.mp4", clip_bytes)  # not a release name
    train = build_index("smarthome", tmp_path, "train")
    assert _pairs(train) == [("Walk_p03_r01_v16_c06.mp4", 29)]
    assert train.skipped == {
        "activity Pour.Fromcup not in CS classes": 1,
        "name not <Activity>_pPP_rRR_vVV_cCC": 1,
    }
    assert _pairs(build_index("smarthome", tmp_path, "test")) == [("Cook.Cleandishes_p02_r00_v02_c03.mp4", 0)]
    assert _pairs(build_index("smarthome", tmp_path, "val")) == []  # alias of validation


# ------------------------------------------------------------------------------------------------ k400


def test_k400_csv_with_quoted_labels(tmp_path, clip_bytes):
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        '"air drumming",a_b-c_d1,13,23,train,0\n'  # underscores in the id: the name is id_start_end
        "abseiling,xyz,0,10,train,0\n"
        '"passing American football (in game)",gone,5,15,train,0\n'  # listed, no file: missing
    )
    (ann / "val.csv").write_text('label,youtube_id,time_start,time_end,split\n"bowling",v1,100,110,val\n')
    _put(tmp_path, "train/air drumming/a_b-c_d1_000013_000023.mp4", clip_bytes)  # in a label folder
    _put(tmp_path, "train/xyz_000000_000010.mp4", clip_bytes)  # flat
    _put(tmp_path, "val/v1_000100_000110.mp4", clip_bytes)
    index = build_index("k400", tmp_path, "train")
    # classes: the canonical 400, sorted, whichever csv files are present
    assert len(index.classes) == 400 and index.classes[:2] == ["abseiling", "air drumming"]
    assert _pairs(index) == [
        ("train/air drumming/a_b-c_d1_000013_000023.mp4", 1),
        ("train/xyz_000000_000010.mp4", 0),
    ]
    football = index.classes.index("passing American football (in game)")
    assert [(m.path, m.label) for m in index.missing] == [("train/gone_000005_000015.mp4", football)]
    bowling = index.classes.index("bowling")
    assert _pairs(build_index("k400", tmp_path, "validation")) == [("val/v1_000100_000110.mp4", bowling)]
    with pytest.raises(FileNotFoundError, match="test.csv"):
        build_index("k400", tmp_path, "test")


# ------------------------------------------------------------------------------------------------ ssv2


def test_ssv2_templates_with_brackets(tmp_path, clip_bytes):
    labels = {"Holding something next to something": "0", "Pushing something from left to right": "1"}
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "labels.json").write_text(json.dumps(labels))
    train = [
        {"id": "78687", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
        {"id": "42", "label": "holding potato next to bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "bottle"]},
        {"id": "7", "label": "x", "template": "Spinning [something]", "placeholders": ["x"]},
        {"id": "8", "label": "y", "template": "Holding [something] next to [something]", "placeholders": []},
    ]  # fmt: skip
    (tmp_path / "labels" / "train.json").write_text(json.dumps(train))
    for vid in ("78687", "42", "7"):
        _put(tmp_path, f"20bn-something-something-v2/{vid}.webm", clip_bytes)
    index = build_index("ssv2", tmp_path, "train")
    assert index.classes == list(labels)
    assert _pairs(index) == [
        ("20bn-something-something-v2/42.webm", 0),
        ("20bn-something-something-v2/78687.webm", 1),
    ]
    assert [m.path for m in index.missing] == ["20bn-something-something-v2/8.webm"]
    assert index.skipped == {"template not in labels.json": 1}
    with pytest.raises(ValueError, match=r"unknown split 'testing'.*\['train', 'validation', 'test'\]"):
        build_index("ssv2", tmp_path, "testing")


# ---------------------------------------------------------------------------------------------- ucf101


def test_ucf101_lists_and_test_labels_from_folder(tmp_path, clip_bytes):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 2\n"
    )
    # Testlists carry no label; the file name's class spelling differs from classInd (as in the release).
    (lists / "testlist01.txt").write_text(
        "HandstandPushups/v_HandStandPushups_g01_c01.avi\nYoYo/v_YoYo_g01_c01.avi\nYoYo/v_YoYo_g02_c01.avi\n"
    )
    (lists / "trainlist02.txt").write_text("YoYo/v_YoYo_g01_c01.avi 3\n")
    for rel in (
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi",
        "HandstandPushups/v_HandStandPushups_g01_c01.avi",
        "YoYo/v_YoYo_g01_c01.avi",
    ):
        _put(tmp_path, f"UCF-101/{rel}", clip_bytes)
    train = build_index("ucf101", tmp_path, "train")
    assert train.classes == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
    assert _pairs(train) == [
        ("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0),
        ("UCF-101/HandstandPushups/v_HandStandPushups_g08_c01.avi", 1),
    ]
    test = build_index("ucf101", tmp_path, "test")
    assert _pairs(test) == [
        ("UCF-101/HandstandPushups/v_HandStandPushups_g01_c01.avi", 1),
        ("UCF-101/YoYo/v_YoYo_g01_c01.avi", 2),
    ]
    assert [m.path for m in test.missing] == ["UCF-101/YoYo/v_YoYo_g02_c01.avi"]
    split2 = build_index("ucf101", tmp_path, "train", load_dataset_config("ucf101", ["protocol=2"]))
    assert _pairs(split2) == [("UCF-101/YoYo/v_YoYo_g01_c01.avi", 2)] and split2.protocol == "2"


# ---------------------------------------------------------------------------------------------- hmdb51


def test_hmdb51_split_files(tmp_path, clip_bytes):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (splits / "wave_test_split1.txt").write_text("d.avi 2 \ne.avi 1 \n")
    (splits / "wave_test_split2.txt").write_text("d.avi 1 \ne.avi 2 \n")
    for rel in ("brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "wave/d.avi"):
        _put(tmp_path, rel, clip_bytes)
    train = build_index("hmdb51", tmp_path, "train")
    assert train.classes == ["brush_hair", "wave"]
    assert _pairs(train) == [("brush_hair/a.avi", 0)]
    assert [(m.path, m.label) for m in train.missing] == [("wave/e.avi", 1)]
    assert train.skipped == {"unused in split 1": 1}
    assert _pairs(build_index("hmdb51", tmp_path, "test")) == [("brush_hair/b.avi", 0), ("wave/d.avi", 1)]
    split2 = build_index("hmdb51", tmp_path, "train", load_dataset_config("hmdb51", ["protocol=2"]))
    assert _pairs(split2) == [("wave/d.avi", 0)] and split2.classes == ["wave"]


# -------------------------------------------------------------------------------------------- diving48


def test_diving48_v2_json_with_segments(tmp_path, clip_bytes):
    train = [
        {"vid_name": "-mmq0PT-u8k_00155", "label": 0, "start_frame": 0, "end_frame": 184},
        {"vid_name": "x_00002", "label": 47, "start_frame": 3, "end_frame": 40},
        {"vid_name": "lost_00001", "label": 5, "start_frame": 0, "end_frame": 10},
    ]
    (tmp_path / "Diving48_V2_train.json").write_text(json.dumps(train))
    (tmp_path / "Diving48_V2_test.json").write_text(json.dumps([train[1]]))
    for name in ("-mmq0PT-u8k_00155", "x_00002"):
        _put(tmp_path, f"rgb/{name}.mp4", clip_bytes)
    index = build_index("diving48", tmp_path, "train")
    assert len(index.classes) == 48
    got = [(r.path, r.label, r.start_frame, r.end_frame) for r in index.records]
    assert got == [("rgb/-mmq0PT-u8k_00155.mp4", 0, 0, 184), ("rgb/x_00002.mp4", 47, 3, 40)]
    assert [m.path for m in index.missing] == ["rgb/lost_00001.mp4"]
    vocab = [["Back", f"{i}som", "NoTwis", "PIKE"] for i in range(48)]
    (tmp_path / "Diving48_vocab.json").write_text(json.dumps(vocab))
    assert build_index("diving48", tmp_path, "test").classes[47] == "Back 47som NoTwis PIKE"


# ---------------------------------------------------------------------------------------------- folder


def test_folder_layout_classes_from_all_splits(tmp_path, clip_bytes):
    for rel in ("train/cat/1.mp4", "train/dog/2.mp4", "validation/dog/3.mp4", "test/emu/4.avi"):
        _put(tmp_path, rel, clip_bytes)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not a video")
    train = build_index("folder", tmp_path, "train")
    assert train.classes == ["cat", "dog", "emu"]  # union of all splits: val lacks cat, train lacks emu
    assert _pairs(train) == [("train/cat/1.mp4", 0), ("train/dog/2.mp4", 1)]
    assert train.skipped == {"not a video file extension": 1}
    assert _pairs(build_index("folder", tmp_path, "val")) == [("validation/dog/3.mp4", 1)]
    assert _pairs(build_index("folder", tmp_path, "test")) == [("test/emu/4.avi", 2)]
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(FileNotFoundError, match="test"):
        build_index("folder", tmp_path, "test")


# ---------------------------------------------------------------------------------------------- config


def test_dataset_configs_load_with_method_defaults():
    cfgs = {name: load_dataset_config(name) for name in DATASETS}
    assert all(c.name == n for n, c in cfgs.items())
    assert (cfgs["k400"].sampling, cfgs["k400"].num_frames, cfgs["k400"].frame_interval) == ("dense", 8, 16)
    assert {n for n, c in cfgs.items() if c.sampling == "uniform"} == set(DATASETS) - {"k400"}
    assert cfgs["smarthome"].protocol == "cs" and cfgs["ucf101"].protocol == "1"
    assert load_dataset_config("hmdb51", ["protocol=3", "num_crops=3"]).protocol == "3"


def test_bad_names_list_the_valid_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'kinetics'.*'k400'"):
        build_index("kinetics", tmp_path, "train")
    with pytest.raises(ConfigError, match=r"unknown dataset 'kinetics'.*'smarthome'"):
        load_dataset_config("kinetics")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*\['train', 'validation', 'test'\]"):
        build_index("smarthome", tmp_path, "dev")
    with pytest.raises(ConfigError, match=r"protocol.*\['cs', 'cv1', 'cv2'\].*'cv3'"):
        load_dataset_config("smarthome", ["protocol=cv3"])
    with pytest.raises(ConfigError, match=r"protocol.*\['1', '2', '3'\]"):
        load_dataset_config("ucf101", ["protocol=4"])
    with pytest.raises(ConfigError, match="num_crops"):
        load_dataset_config("folder", ["num_crops=2"])
    with pytest.raises(ValueError, match="given with a config for 'folder'"):
        build_index("k400", tmp_path, "train", DatasetConfig(name="folder"))


# ---------------------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:  # through amflow.cli.main: its one error path turns errors into exit 2
    return main(argv)


def test_datasets_list_prints_only_path_tab_label(tmp_path, clip_bytes, capsys):
    _put(tmp_path, "mp4/Walk_p03_r01_v16_c01.mp4", clip_bytes)
    _put(tmp_path, "mp4/Cutbread_p04_r00_v08_c01.mp4", clip_bytes)
    _put(tmp_path, "mp4/Cook.Cut_p04_r00_v08_c01.mp4", clip_bytes)  # not a CV class
    _put(tmp_path, "mp4/Walk_p03_r01_v16_c02.mp4", clip_bytes)  # camera 2: CV test
    argv = ["datasets", "list", "--dataset", "smarthome", "--root", str(tmp_path), "--protocol", "cv1"]
    assert _cli([*argv, "--split", "train"]) == 0
    out, err = capsys.readouterr()
    assert out == "mp4/Cutbread_p04_r00_v08_c01.mp4\t0\nmp4/Walk_p03_r01_v16_c01.mp4\t18\n"
    assert "2 clips, 19 classes" in err and "Cook.Cut" in err
    assert _cli([*argv, "--split", "bogus"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown split 'bogus'" in err

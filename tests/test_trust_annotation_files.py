"""Real annotation files, as their authors publish them and as users' editors save them (issue 21 s5).

Kinetics' own validation file is ``validate.csv`` and its class indices are the canonical 400 whatever
CSVs are present; SSv2's ``test`` split is listable (labels from ``test-answers.csv``); an mmaction2
multi-label line is refused, not read as a segment; a segment past the video's end is never silently
copies of the last frame; lists in UTF-8 with a BOM, UTF-16, CRLF, trailing spaces, ``./`` and backslash
spellings read as the plain file does, and two spellings of one file are one file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from amflow.cli import main
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import build_index, load_dataset_config
from stage1_extract.videos.video import VideoClipDataset

HEADER = "label,youtube_id,time_start,time_end,split\n"


def put(root: Path, rel: str, data: bytes | str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def pairs(index) -> list[tuple[str, int]]:
    return [(r.path, r.label) for r in index.records]


# ------------------------------------------------------------------------------------------------- K400
def test_k400_validate_csv_and_canonical_class_indices(tmp_path, clip_bytes):
    put(tmp_path, "validate.csv", HEADER + "zumba,v1,0,10,validate\nabseiling,v2,3,13,validate\n")
    put(tmp_path, "validate/zumba/v1_000000_000010.mp4", clip_bytes)
    put(tmp_path, "validate/abseiling/v2_000003_000013.mp4", clip_bytes)
    alone = build_index("k400", tmp_path, "val")  # found under the release's own name
    assert len(alone.classes) == 400 and alone.classes[0] == "abseiling" and alone.classes[-1] == "zumba"
    assert pairs(alone) == [
        ("validate/abseiling/v2_000003_000013.mp4", 0),
        ("validate/zumba/v1_000000_000010.mp4", 399),
    ]
    # another CSV beside it (with other labels) changes no index
    put(tmp_path, "train.csv", HEADER + '"air drumming",t,0,10,train\n"yoga",u,0,10,train\n')
    assert build_index("k400", tmp_path, "validation").classes == alone.classes
    assert pairs(build_index("k400", tmp_path, "val")) == pairs(alone)
    # a label that is not one of the 400 (a Kinetics-700 file) is refused, naming the file
    put(tmp_path, "train.csv", HEADER + '"zumba",t,0,10,train\n"walking with crutches",u,0,10,train\n')
    with pytest.raises(
        ValueError, match=r"train.csv: label\(s\) \['walking with crutches'\] are not among Kinetics-400"
    ):
        build_index("k400", tmp_path, "train")


# ------------------------------------------------------------------------------------------------- SSv2
def test_ssv2_test_split_is_listed_with_labels_from_test_answers(tmp_path, clip_bytes, capsys):
    labels = {"Holding something next to something": "0", "Pushing something from left to right": "1"}
    put(tmp_path, "labels/labels.json", json.dumps(labels))
    put(tmp_path, "labels/test.json", json.dumps([{"id": "5"}, {"id": "9"}]))  # ids only, as released
    for vid in ("5", "9"):
        put(tmp_path, f"20bn-something-something-v2/{vid}.webm", clip_bytes)
    unlabelled = build_index("ssv2", tmp_path, "test")
    assert pairs(unlabelled) == [
        ("20bn-something-something-v2/5.webm", -1),
        ("20bn-something-something-v2/9.webm", -1),
    ]
    put(
        tmp_path,
        "labels/test-answers.csv",
        "5;Pushing something from left to right\r\n9;Holding something next to something\r\n",
    )
    argv = ["datasets", "list", "--dataset", "ssv2", "--root", str(tmp_path), "--split", "test"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "20bn-something-something-v2/5.webm\t1",
        "20bn-something-something-v2/9.webm\t0",
    ]


# -------------------------------------------------------------------------------------------- list files
def test_a_multi_label_line_is_refused_and_a_segment_must_be_asked_for(tmp_path, clip_bytes, capsys):
    put(tmp_path, "test.mp4", clip_bytes)
    put(tmp_path, "train.txt", "test.mp4 0 2 4\n")  # mmaction2 multi-label: classes 0, 2 and 4
    argv = ["datasets", "list", "--dataset", "list", "--root", str(tmp_path), "--split", "train"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "train.txt:1: 3 values after the path (0 2 4): a multi-label line" in err
    )
    index = build_index("list", tmp_path, "train", load_dataset_config("list", ["segments=true"]))
    assert [(r.path, r.label, r.start_frame, r.end_frame) for r in index.records] == [("test.mp4", 0, 2, 4)]


PLAIN = "clips/a.mp4 cat\nclips/b.mp4 1\n"
SPELLINGS = {
    "utf-8 with BOM, CRLF": "\ufeffclips/a.mp4 cat\r\nclips/b.mp4 1\r\n".encode(),
    "utf-16 (Windows 'Unicode'), trailing spaces": "clips/a.mp4 cat  \r\nclips/b.mp4 1 \r\n".encode("utf-16"),
    "./ and // and backslashes": b".\\clips\\a.mp4 cat\n./clips//b.mp4\t1\n",
    "csv with BOM and CRLF": "\ufeffpath,label\r\n./clips/a.mp4 , cat\r\nclips\\b.mp4,1\r\n".encode(),
}


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_lists_read_as_editors_write_them(case, tmp_path, clip_bytes):
    for rel in ("clips/a.mp4", "clips/b.mp4"):
        put(tmp_path, rel, clip_bytes)
    put(tmp_path, "classes.txt", "\ufeffcat\r\ndog\r\n")  # a BOM and CRLF here too
    put(tmp_path, "plain.txt", PLAIN)
    name = "train.csv" if "csv" in case else "train.txt"
    put(tmp_path, name, SPELLINGS[case])
    cfg = load_dataset_config("list")
    expected = pairs(
        build_index(
            "list", tmp_path, "train", load_dataset_config("list", [f"annotations={tmp_path}/plain.txt"])
        )
    )
    assert expected == [("clips/a.mp4", 0), ("clips/b.mp4", 1)]
    assert pairs(build_index("list", tmp_path, "train", cfg)) == expected


def test_two_spellings_of_one_file_are_one_file(tmp_path, clip_bytes):
    put(tmp_path, "a/b.mp4", clip_bytes)
    put(tmp_path, "train.txt", "a/b.mp4 0\n./a//b.mp4 0\n")
    with pytest.raises(ValueError, match=r"train.txt:2: 'a/b.mp4' is listed twice \(also line 1"):
        build_index("list", tmp_path, "train", load_dataset_config("list"))
    put(tmp_path, "train.txt", "a/b.mp4 0\n".encode("utf-16-le"))  # UTF-16 without a BOM
    with pytest.raises(ValueError, match=r"train.txt: holds NUL characters \(UTF-16 without a BOM"):
        build_index("list", tmp_path, "train", load_dataset_config("list"))


def test_ucf101_lists_with_crlf_and_a_bom(tmp_path, clip_bytes):
    put(tmp_path, "ucfTrainTestlist/classInd.txt", "\ufeff1 ApplyEyeMakeup\r\n2 YoYo\r\n")
    put(tmp_path, "ucfTrainTestlist/trainlist01.txt", "YoYo/v_YoYo_g01_c01.avi 2\r\n")
    put(tmp_path, "UCF-101/YoYo/v_YoYo_g01_c01.avi", clip_bytes)
    index = build_index("ucf101", tmp_path, "train")
    assert index.classes == ["ApplyEyeMakeup", "YoYo"] and pairs(index) == [
        ("UCF-101/YoYo/v_YoYo_g01_c01.avi", 1)
    ]


# --------------------------------------------------------------------------------------------- segments
def test_a_segment_past_the_video_end_is_named(tmp_path, clip_bytes, caplog):
    """The clip has 8 frames: [2, 20) is cut at the end with a warning naming the file; [9, 12) starts
    after the last frame and is recorded as the clip's failure instead of 8 copies of frame 7."""
    put(tmp_path, "a.mp4", clip_bytes)
    put(tmp_path, "b.mp4", clip_bytes)
    put(tmp_path, "test.txt", "a.mp4 0 2 20\nb.mp4 0 9 12\n")
    cfg = load_dataset_config("list", ["segments=true", "num_frames=4"])
    index = build_index("list", tmp_path, "test", cfg)
    dataset = VideoClipDataset(index.records, tmp_path, ClipGeometry.of_dataset(cfg, crop_size=32))
    with caplog.at_level(logging.WARNING):
        first = dataset[0]
    assert first["error"] is None
    assert any("a.mp4: segment [2, 20) ends after the video's 8 frames" in r.message for r in caplog.records)
    second = dataset[1]
    assert second["error"][0] == "SegmentOutsideVideo"
    assert "b.mp4: segment [9, 12) starts after the video's last frame 7" in second["error"][1]

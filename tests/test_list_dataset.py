"""The ``list`` dataset (mmaction2-style text lists and CSV, one file per split): ``amflow datasets list``
prints exactly the hand-written clips and labels, bad lines are errors naming file and line, and a
``start end`` segment is where the frames are sampled from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stage1_extract  # noqa: F401  (first: fixes the torchvision import before anything imports timm)
from amflow.cli import main
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import build_index, load_dataset_config
from stage1_extract.videos.synthetic import write_video
from stage1_extract.videos.video import VideoClipDataset


def _put(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _listed(argv: list[str], capsys) -> tuple[list[tuple[str, int]], str]:
    assert main(["datasets", "list", *argv]) == 0
    out, err = capsys.readouterr()
    return [(p, int(y)) for p, y in (line.split("\t") for line in out.splitlines())], err


def test_text_lists_round_trip_through_datasets_list(tmp_path, clip_bytes, capsys):
    root = tmp_path / "data"
    for rel in ("clips/cat/1.mp4", "clips/dog/2.mp4", "clips/dog/3.avi", "clips/emu 4.mp4"):
        _put(root / rel, clip_bytes)
    _put(root / "classes.txt", "# index order\ncat\ndog\nemu\n")
    _put(root / "train.txt", "# mine\nclips/dog/2.mp4 dog\n\nclips/cat/1.mp4 0 2 6\nclips/gone.mp4 emu\n")
    _put(root / "validation.txt", "clips/dog/3.avi 1\n")  # 'val' may be spelled out
    _put(root / "test.csv", "path,label,start,end\nclips/emu 4.mp4,emu,0,8\n# a comment row\n")
    argv = ["segments=true", "--dataset", "list", "--root", str(root), "--split"]
    listed, err = _listed([*argv, "train"], capsys)
    assert listed == [("clips/cat/1.mp4", 0), ("clips/dog/2.mp4", 1)]
    assert "2 clips, 3 classes, 1 missing" in err and "missing: clips/gone.mp4" in err
    assert _listed([*argv, "val"], capsys)[0] == [("clips/dog/3.avi", 1)]
    assert _listed([*argv, "test"], capsys)[0] == [("clips/emu 4.mp4", 2)]
    index = build_index("list", root, "train", load_dataset_config("list", ["segments=true"]))
    assert index.classes == ["cat", "dog", "emu"]
    assert [(r.start_frame, r.end_frame) for r in index.records] == [(2, 6), (None, None)]


def test_csv_given_with_annotations_and_classes_from_sorted_labels(tmp_path, clip_bytes, capsys):
    root = tmp_path / "videos"
    for rel in ("a.mp4", "b.mp4", "c.mp4"):
        _put(root / rel, clip_bytes)
    lists = tmp_path / "lists"  # outside ROOT: the annotation file may live anywhere
    _put(lists / "train.csv", "path,label\na.mp4,zebra\nb.mp4,ant\n")
    _put(lists / "val.csv", "c.mp4,moth\n")
    _put(root / "val.txt", "c.mp4,moth\n")  # not read: --annotations names the file
    argv = ["--dataset", "list", "--root", str(root), "--split", "train"]
    argv += ["--annotations", str(lists / "train.csv")]
    assert _listed(argv, capsys)[0] == [("a.mp4", 1), ("b.mp4", 0)]  # classes: ant, zebra (this file)
    # "{split}" makes one setting serve every split, and then every split's labels make the classes
    template = load_dataset_config("list", [f"annotations={lists}/{{split}}.csv"])
    train = build_index("list", root, "train", template)
    assert train.classes == ["ant", "moth", "zebra"] and [r.label for r in train.records] == [2, 0]
    assert [(r.path, r.label) for r in build_index("list", root, "val", template).records] == [("c.mp4", 1)]


def test_integer_labels_without_classes_txt(tmp_path, clip_bytes):
    _put(tmp_path / "x.mp4", clip_bytes)
    _put(tmp_path / "train.txt", "x.mp4 2\n")
    _put(tmp_path / "test.txt", "x.mp4 4\n")
    index = build_index("list", tmp_path, "train", load_dataset_config("list"))
    assert index.classes == ["0", "1", "2", "3", "4"] and index.records[0].label == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("../../outside.mp4 0", r"train.txt:3: clip path '../../outside.mp4': leaves the dataset root"),
        ("/etc/passwd 0", r"train.txt:3: clip path '/etc/passwd': absolute path"),
        ("ok/../../x.mp4 0", r"train.txt:3: .*leaves the dataset root"),
        ("a.mp4 0 5", r"train.txt:3: expected 'path label' or 'path label start end', got 3 columns"),
        ("a.mp4 0 5 7 9", r"train.txt:3: expected 'path label' or 'path label start end', got 5 columns"),
        ("a.mp4 bird", r"train.txt:3: label 'bird' is neither a class of .*classes.txt nor an index 0..1"),
        ("a.mp4 7", r"train.txt:3: label '7'"),
        ("a.mp4 0 9 4", r"train.txt:3: end frame 4 is not after start 9"),
        ("a.mp4 0 -1 4", r"train.txt:3: start frame -1 is negative"),
        ("b.mp4 0", r"train.txt:3: 'b.mp4' is listed twice \(also line 2;"),
    ],
)
def test_bad_lines_are_refused_with_the_line_number(tmp_path, clip_bytes, capsys, line, message):
    _put(tmp_path / "a.mp4", clip_bytes)
    _put(tmp_path / "classes.txt", "cat\ndog\n")
    _put(tmp_path / "train.txt", f"# clips\nb.mp4 cat\n{line}\n")
    with pytest.raises(ValueError, match=message):
        build_index("list", tmp_path, "train", load_dataset_config("list", ["segments=true"]))
    argv = ["datasets", "list", "--dataset", "list", "--root", str(tmp_path), "--split", "train"]
    assert main([*argv, "segments=true"]) == 2
    err = capsys.readouterr().err
    assert "train.txt:3" in err and len(err.strip().splitlines()) == 1


def test_missing_split_file_and_key_on_another_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no annotation file for split 'test'.*test.txt, test.csv"):
        build_index("list", tmp_path, "test", load_dataset_config("list"))
    with pytest.raises(ValueError, match="only the list dataset reads it"):
        load_dataset_config("folder", ["annotations=train.txt"])


def test_segment_columns_choose_the_sampled_frames(tmp_path):
    """Frame i of a 20-frame clip is grey level 10*i; 'clip.mp4 0 10 14' with 4 frames samples 10..13."""
    frames = np.repeat((np.arange(20) * 10).astype(np.uint8)[:, None, None, None], 32, axis=1)
    write_video(tmp_path / "clip.mp4", np.ascontiguousarray(np.broadcast_to(frames, (20, 32, 32, 3))), crf=0)
    _put(tmp_path / "test.txt", "clip.mp4 0 10 14\n")
    cfg = load_dataset_config("list", ["num_frames=4", "segments=true"])
    index = build_index("list", tmp_path, "test", cfg)
    item = VideoClipDataset(index.records, tmp_path, ClipGeometry.of_dataset(cfg, 32))[0]
    assert item["error"] is None
    levels = item["video"][0].float().mean(dim=(1, 2, 3))  # (T,)
    assert np.allclose(levels.numpy(), [100, 110, 120, 130], atol=3)

"""The ``list`` dataset: users' own videos named in annotation lists, one file per split.

Two formats, chosen by the file's extension:

- text (mmaction2's video lists): ``relative/path.mp4 label``, whitespace-separated; blank lines and
  lines starting with ``#`` are ignored. Paths with spaces need the CSV format. With ``segments: true``
  also ``relative/path.mp4 label start end``; without it a line with more values after the path is
  refused, since mmaction2 writes its multi-label lines so (``path l1 l2 l3``) and amflow stores one
  label per clip.
- CSV (``.csv``): ``path,label`` or ``path,label,start,end`` rows; an optional header row whose first
  cell is ``path``; rows whose first cell starts with ``#`` are ignored.

``label`` is a class index or a class name. Class names come from ``classes.txt`` (one name per line, in
index order; in ROOT, else beside the annotation file); without it, from the labels of every split's file
found: if all are integers they are the indices (classes ``"0"`` .. ``"max"``), else they are names, sorted.
``start``/``end`` are frame numbers (``end`` exclusive): frames are sampled inside that segment, clamped
to the video. Paths are relative to ROOT; an absolute path or one that leaves ROOT is an error naming the
file and line, as is any malformed line. Each video may be listed once per split: ``./a//b.mp4`` and
``a\\b.mp4`` are ``a/b.mp4``. Files are read as editors write them (``datasets.read_text_file``: UTF-8
with or without a BOM, UTF-16 with one, CRLF line ends, trailing spaces).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from stage1_extract.videos.bucket import BucketPath, annotation_location
from stage1_extract.videos.clip_paths import clip_path_error, normalise_clip_path
from stage1_extract.videos.datasets import SPLITS, ClipRecord, DatasetConfig, DatasetIndex, read_text_file

_FILE_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_EXTENSIONS = (".txt", ".csv")


@dataclass
class ListEntry:
    """One annotation line: where it is (file, line number) and what it says."""

    source: Path | BucketPath
    line: int
    path: str
    label: str
    start_frame: int | None = None
    end_frame: int | None = None

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def split_file(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> Path | BucketPath | None:
    """The split's annotation file: ``cfg.annotations`` ("{split}" filled in; a local path or an s3://
    URL), else ROOT/<split>.txt|.csv."""
    if cfg.annotations is not None:
        return annotation_location(cfg.annotations.format(split=split))
    for name in _FILE_NAMES[split]:
        for ext in _EXTENSIONS:
            if (root / f"{name}{ext}").is_file():
                return root / f"{name}{ext}"
    return None


def _frame(value: str, what: str, where: str) -> int:
    try:
        frame = int(value)
    except ValueError:
        raise ValueError(f"{where}: {what} {value!r} is not an integer frame number") from None
    if frame < 0:
        raise ValueError(f"{where}: {what} {frame} is negative")
    return frame


def _entry(
    source: Path | BucketPath, line: int, cells: list[str], text_format: bool, segments: bool
) -> ListEntry:
    where = f"{source}:{line}"
    if text_format and not segments and len(cells) > 2:
        raise ValueError(
            f"{where}: {len(cells) - 1} values after the path ({' '.join(cells[1:])}): a multi-label line "
            "(mmaction2's 'path l1 l2 ...')? amflow takes one label per clip; for a segment 'path label "
            "start end' set data.segments=true, or use a .csv file with a path,label,start,end header"
        )
    if len(cells) not in (2, 4):
        expected = "'path label' or 'path label start end'" if text_format else "path,label[,start,end]"
        hint = " (for paths with spaces use a .csv file)" if text_format else ""
        raise ValueError(f"{where}: expected {expected}, got {len(cells)} columns{hint}")
    path, label = normalise_clip_path(cells[0]), cells[1]
    if not label:
        raise ValueError(f"{where}: empty label")
    error = clip_path_error(path)
    if error is not None:
        raise ValueError(f"{where}: clip path {path!r}: {error}; refused")
    entry = ListEntry(source, line, path, label)
    if len(cells) == 4:
        entry.start_frame = _frame(cells[2], "start frame", where)
        entry.end_frame = _frame(cells[3], "end frame", where)
        if entry.end_frame <= entry.start_frame:
            raise ValueError(f"{where}: end frame {entry.end_frame} is not after start {entry.start_frame}")
    return entry


def parse_list_file(source: Path | BucketPath, segments: bool = False) -> list[ListEntry]:
    """The entries of one annotation file (text or CSV by extension); a ValueError names file and line."""
    text = read_text_file(source)
    entries: list[ListEntry] = []
    if source.suffix.lower() == ".csv":
        reader = csv.reader(text.splitlines())
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if not entries and cells[0].lower() == "path":
                continue  # header row
            entries.append(_entry(source, reader.line_num, cells, text_format=False, segments=True))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append(_entry(source, number, line.split(), text_format=True, segments=segments))
    seen: dict[str, int] = {}
    for entry in entries:
        if entry.path in seen:
            raise ValueError(
                f"{entry.where()}: {entry.path!r} is listed twice (also line {seen[entry.path]}; "
                "spellings such as ./a//b.mp4 or a\\b.mp4 name one file)"
            )
        seen[entry.path] = entry.line
    return entries


def _read_classes(path: Path | BucketPath) -> list[str]:
    names = [n.strip() for n in read_text_file(path).splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(f"{path}: no class names")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path}: class {dup!r} is listed twice")
    return names


def read_list(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """The clips of ``split``: entries of its annotation file, present files in ``records``, absent ones
    in ``missing``; classes from ``classes.txt`` or the labels of all splits' files."""
    source = split_file(root, split, cfg)
    if source is None:
        tried = [f"{n}{e}" for n in _FILE_NAMES[split] for e in _EXTENSIONS]
        raise FileNotFoundError(f"list dataset: no annotation file for split {split!r} in {root} "
                                f"(tried {', '.join(tried)}; or pass --annotations FILE)")  # fmt: skip
    if not source.is_file():
        raise FileNotFoundError(f"list dataset: annotation file {source} not found")
    entries = parse_list_file(source, cfg.segments)
    candidates = (root / "classes.txt", source.parent / "classes.txt")
    classes_path = next((p for p in candidates if p.is_file()), None)
    if classes_path is not None:
        classes = _read_classes(classes_path)
    else:  # every split's labels, so that the splits agree on the indices
        labels = {e.label for e in entries}
        for other in SPLITS["list"]:
            other_file = split_file(root, other, cfg)
            if other != split and other_file is not None and other_file.is_file():
                labels.update(e.label for e in parse_list_file(other_file, cfg.segments))
        if all(label.isdigit() for label in labels):
            classes = [str(i) for i in range(max(int(label) for label in labels) + 1)] if labels else []
        else:
            classes = sorted(labels)
    class_index = {c: i for i, c in enumerate(classes)}
    index = DatasetIndex("list", split, None, root, classes)
    for entry in entries:
        label = class_index.get(entry.label)
        if label is None and entry.label.isdigit() and int(entry.label) < len(classes):
            label = int(entry.label)
        if label is None:
            origin = classes_path or "the labels"
            raise ValueError(
                f"{entry.where()}: label {entry.label!r} is neither a class of {origin} nor an index "
                f"0..{len(classes) - 1}"
            )
        record = ClipRecord(entry.path, label, entry.start_frame, entry.end_frame)
        (index.records if (root / entry.path).is_file() else index.missing).append(record)
    return index

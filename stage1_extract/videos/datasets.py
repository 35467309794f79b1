"""Dataset configs and readers: which clips a split holds, where their files are, and their labels.

Every reader turns a dataset's release layout (METHOD.md section 5) into a ``DatasetIndex``: clip paths
relative to ROOT with integer labels, class names in label order, the listed files that are absent
(``missing``, reported, never raised), the listed paths that are absolute or leave ROOT (``refused``,
never opened; extraction records them as failed) and counts of clips left out and why (``skipped``).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from foundation.config import CONFIG_ROOT, ConfigError, load_config
from stage1_extract.videos.bucket import BucketPath, location, walk
from stage1_extract.videos.clip_paths import clip_path_error, normalise_clip_path
from stage1_extract.videos.k400_classes import KINETICS400_CLASSES

DATASETS = ("smarthome", "k400", "ssv2", "ucf101", "hmdb51", "diving48", "folder", "list")
SPLITS: dict[str, tuple[str, ...]] = {
    "smarthome": ("train", "validation", "test"),
    "k400": ("train", "val", "test"),
    "ssv2": ("train", "validation", "test"),
    "ucf101": ("train", "test"),
    "hmdb51": ("train", "test"),
    "diving48": ("train", "test"),
    "folder": ("train", "val", "test"),
    "list": ("train", "val", "test"),
}
# One key, ``protocol``, for every dataset that has several: Smarthome's protocol, UCF101's and HMDB51's
# official split number (as a string; ``protocol=2`` on the command line is accepted too).
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "smarthome": ("cs", "cv1", "cv2"),
    "ucf101": ("1", "2", "3"),
    "hmdb51": ("1", "2", "3"),
}
_SPLIT_ALIASES = {"val": "validation", "validation": "val"}
DEFAULT_MAX_VIDEO_MB = 1024.0  # a video under an s3:// root is fetched whole into memory
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp")

# Where each release keeps its videos and annotation files, relative to ROOT, tried in order when the
# config leaves ``video_dir`` / ``annotation_dir`` unset ("" is ROOT itself; "{split}" is the split name).
_VIDEO_DIRS: dict[str, tuple[str, ...]] = {
    "smarthome": ("mp4", ""),
    "k400": ("{split}", "videos/{split}"),
    "ssv2": ("20bn-something-something-v2", "videos", ""),
    "ucf101": ("UCF-101", "UCF101", ""),
    "hmdb51": ("hmdb51_org", "videos", ""),
    "diving48": ("rgb", ""),
}
_ANNOTATION_DIRS: dict[str, tuple[str, ...]] = {
    "k400": ("annotations", ""),
    "ssv2": ("labels", "annotations", ""),
    "ucf101": ("ucfTrainTestlist", ""),
    "hmdb51": ("testTrainMulti_7030_splits", ""),
    "diving48": ("", "annotations"),
}

# Toyota Smarthome (METHOD.md section 5).
# fmt: off
SMARTHOME_CS_CLASSES = (
    "Cook.Cleandishes", "Cook.Cleanup", "Cook.Cut", "Cook.Stir", "Cook.Usestove", "Cutbread",
    "Drink.Frombottle", "Drink.Fromcan", "Drink.Fromcup", "Drink.Fromglass", "Eat.Attable", "Eat.Snack",
    "Enter", "Getup", "Laydown", "Leave", "Makecoffee.Pourgrains", "Makecoffee.Pourwater",
    "Maketea.Boilwater", "Maketea.Insertteabag", "Pour.Frombottle", "Pour.Fromcan", "Pour.Fromkettle",
    "Readbook", "Sitdown", "Takepills", "Uselaptop", "Usetablet", "Usetelephone", "Walk", "WatchTV",
)
SMARTHOME_CV_CLASSES = (
    "Cutbread", "Drink.Frombottle", "Drink.Fromcan", "Drink.Fromcup", "Drink.Fromglass", "Eat.Attable",
    "Eat.Snack", "Enter", "Getup", "Leave", "Pour.Frombottle", "Pour.Fromcan", "Readbook", "Sitdown",
    "Takepills", "Uselaptop", "Usetablet", "Usetelephone", "Walk",
)
# fmt: on
SMARTHOME_CS_SUBJECTS = {
    "train": frozenset({3, 4, 6, 7, 9, 12, 13, 15, 17}),
    "validation": frozenset({19, 25}),
    "test": frozenset({2, 10, 11, 14, 16, 18, 20}),
}
SMARTHOME_CV_CAMERAS = {
    "cv1": {"train": frozenset({1}), "validation": frozenset({5}), "test": frozenset({2})},
    "cv2": {"train": frozenset({1, 3, 4, 6, 7}), "validation": frozenset({5}), "test": frozenset({2})},
}
_SMARTHOME_NAME = re.compile(
    r"^(?P<activity>.+)_p(?P<person>\d+)_r(?P<rep>\d+)_v(?P<view>\d+)_c(?P<camera>\d+)$"
)
_HMDB_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")
DIVING48_NUM_CLASSES = 48


@dataclass
class DatasetConfig:
    """What to read (dataset, protocol, folders) and how to sample it into views (METHOD.md sections 5-6).

    A clip yields ``num_frames`` frames per temporal clip; at test time ``num_clips`` temporal clips x
    ``num_crops`` spatial crops (1 = centre, 3 = start/centre/end along the long side), in training one
    random clip and crop. ``crop_size`` None means the model's input size (the caller passes it).
    """

    name: str = "folder"
    # smarthome: cs | cv1 | cv2; ucf101 / hmdb51: official split number "1" | "2" | "3"; others: None.
    protocol: str | int | None = None
    num_frames: int = 8
    sampling: Literal["uniform", "dense"] = "uniform"
    frame_interval: int = 16  # dense sampling only: frames between two sampled frames
    num_clips: int = 1  # temporal views at test time
    num_crops: int = 1  # spatial views at test time: 1 or 3
    crop_size: int | None = None
    train_crop: Literal["random", "center"] = "random"
    # Folders relative to ROOT (or absolute); None = the release's usual places, tried in order.
    video_dir: str | None = None
    annotation_dir: str | None = None
    # list dataset only: the split's annotation file (may contain "{split}"); None = ROOT/<split>.txt|.csv.
    annotations: str | None = None
    # list dataset only: text lines may be 'path label start end' (a segment). Off, a line with more than
    # one value after the path is refused: it reads the same as mmaction2's multi-label 'path l1 l2 l3'.
    segments: bool = False
    # ROOT on object storage (s3://...): each video is fetched whole into memory; a larger one is recorded
    # as a failed clip instead. Changes no feature (not in a store's fingerprint).
    max_video_mb: float = DEFAULT_MAX_VIDEO_MB

    def __post_init__(self) -> None:
        if isinstance(self.protocol, int) and not isinstance(self.protocol, bool):
            self.protocol = str(self.protocol)
        if isinstance(self.protocol, str):
            self.protocol = self.protocol.lower()

    def validate(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"key 'name': unknown dataset {self.name!r}; expected one of {list(DATASETS)}")
        valid = PROTOCOLS.get(self.name)
        if valid is None and self.protocol is not None:
            raise ValueError(f"key 'protocol': dataset {self.name!r} has no protocols; leave it null")
        if valid is not None and self.protocol not in valid:
            raise ValueError(
                f"key 'protocol': dataset {self.name!r} expects one of {list(valid)}, got {self.protocol!r}"
            )
        for key in ("num_frames", "frame_interval", "num_clips"):
            if getattr(self, key) < 1:
                raise ValueError(f"key '{key}': expected an integer >= 1, got {getattr(self, key)}")
        if self.num_crops not in (1, 3):
            raise ValueError(f"key 'num_crops': expected 1 or 3, got {self.num_crops}")
        if self.annotations is not None and self.name != "list":
            raise ValueError(f"key 'annotations': only the list dataset reads it, not {self.name!r}")
        if self.segments and self.name != "list":
            raise ValueError(f"key 'segments': only the list dataset reads it, not {self.name!r}")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"key 'crop_size': expected an integer >= 1 or null, got {self.crop_size}")
        if not self.max_video_mb > 0:
            raise ValueError(f"key 'max_video_mb': expected a size in MB > 0, got {self.max_video_mb}")


def load_dataset_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> DatasetConfig:
    """Loads ``configs/datasets/<name>.yaml`` (or a YAML path) with ``key=value`` overrides applied."""
    if str(name_or_path) in DATASETS:
        return load_config(DatasetConfig, CONFIG_ROOT / "datasets" / f"{name_or_path}.yaml", overrides)
    if Path(name_or_path).suffix not in (".yaml", ".yml"):
        raise ConfigError(
            f"unknown dataset {str(name_or_path)!r}; expected one of {list(DATASETS)} or a YAML path"
        )
    return load_config(DatasetConfig, name_or_path, overrides)


@dataclass
class ClipRecord:
    """One clip: its file relative to ROOT, its class index and, for Diving48, its frame segment."""

    path: str
    label: int
    start_frame: int | None = None
    end_frame: int | None = None  # exclusive; clamped to the video's length when decoding


@dataclass
class DatasetIndex:
    """The clips of one split: records found on disk, class names by index, missing files, skip counts."""

    name: str
    split: str
    protocol: str | None
    root: Path | BucketPath
    classes: list[str]
    records: list[ClipRecord] = field(default_factory=list)
    missing: list[ClipRecord] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    refused: list[ClipRecord] = field(default_factory=list)  # absolute or leaving ROOT: never opened

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        """One line for logs: counts of clips, classes, missing and skipped files."""
        proto = f" protocol {self.protocol}" if self.protocol else ""
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.name}{proto} split {self.split}: {len(self.records)} clips, {self.num_classes} classes, "
            f"{len(self.missing)} missing, {len(self.refused)} refused (path outside the root), "
            f"skipped: {skipped}"
        )


def canonical_split(name: str, split: str) -> str:
    """The dataset's own name for ``split`` (``val`` and ``validation`` are aliases), or a ValueError."""
    if name not in SPLITS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    valid = SPLITS[name]
    if split in valid:
        return split
    if _SPLIT_ALIASES.get(split) in valid:
        return _SPLIT_ALIASES[split]
    raise ValueError(f"dataset {name!r}: unknown split {split!r}; expected one of {list(valid)}")


def build_index(name: str, root: str | Path, split: str, cfg: DatasetConfig | None = None) -> DatasetIndex:
    """Lists the clips of ``split`` of dataset ``name`` under ``root`` (settings from ``cfg``).

    Without ``cfg`` the defaults of ``configs/datasets/<name>.yaml`` are used. Records are sorted by path.
    ``root`` may be ``s3://bucket/prefix``: its objects are listed once and read from the bucket.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    if cfg is None:
        cfg = load_dataset_config(name)
    if cfg.name != name:
        raise ValueError(f"build_index: dataset {name!r} given with a config for {cfg.name!r}")
    cfg.validate()
    split = canonical_split(name, split)
    root = location(root)
    if not root.is_dir():
        what = "holds no objects" if isinstance(root, BucketPath) else "is not a directory"
        raise FileNotFoundError(f"dataset root {root} {what}")
    index = _READERS[name](root, split, cfg)
    seen: set[str] = set()
    for record in (*index.records, *index.missing, *index.refused):
        if record.path in seen:
            raise ValueError(f"{name} split {split!r} under {root}: {record.path!r} is listed twice")
        seen.add(record.path)
    index.records.sort(key=lambda r: r.path)
    index.missing.sort(key=lambda r: r.path)
    index.refused.sort(key=lambda r: r.path)
    return index


# ---------------------------------------------------------------------------------------------- helpers


_BOMS = (  # longest first: UTF-32 LE's BOM begins with UTF-16 LE's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_text_file(path: str | Path | BucketPath) -> str:
    """An annotation file's text as editors and scripts write it: UTF-8 with or without a BOM, UTF-16 or
    UTF-32 with one (Windows' "Unicode"); CRLF line ends are split by ``str.splitlines``. Anything else
    is one ValueError naming the file. A ``BucketPath`` is read from object storage."""
    data = (path if isinstance(path, BucketPath) else Path(path)).read_bytes()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text, nor UTF-16 with a BOM ({e.reason} at byte {e.start})"
        ) from None
    if "\0" in text:
        raise ValueError(f"{path}: holds NUL characters (UTF-16 without a BOM? save it as UTF-8)")
    return text


def _is_video(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _first_dir(
    root: Path | BucketPath, configured: str | None, defaults: Iterable[str], split: str
) -> Path | BucketPath:
    """The configured folder, or the first of the release's usual folders that exists."""
    if configured is not None:
        folder = root / configured.format(split=split)
        if not folder.is_dir():
            raise FileNotFoundError(f"video/annotation folder {folder} (from the config) is not a directory")
        return folder
    tried = [root / d.format(split=split) for d in defaults]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"none of these folders exists: {', '.join(map(str, tried))}")


def _find_annotation(
    root: Path | BucketPath, cfg: DatasetConfig, names: Sequence[str], split: str
) -> Path | BucketPath:
    """The first existing annotation file among ``names`` in the configured or usual annotation folders."""
    dirs = [cfg.annotation_dir] if cfg.annotation_dir is not None else _ANNOTATION_DIRS[cfg.name]
    tried = []
    for d in dirs:
        for n in names:
            path = root / d / n.format(split=split)
            tried.append(path)
            if path.is_file():
                return path
    raise FileNotFoundError(f"{cfg.name}: annotation file not found; tried {', '.join(map(str, tried))}")


class _VideoFiles:
    """The video files under one folder, found by relative path without extension or by file stem."""

    def __init__(self, root: Path | BucketPath, folder: Path | BucketPath) -> None:
        self.by_key: dict[str, str] = {}
        self.by_stem: dict[str, str] = {}
        for dirpath, dirnames, filenames in walk(folder):
            dirnames.sort()
            for fn in sorted(filenames):
                if not _is_video(fn):
                    continue
                full = dirpath / fn
                rel_root = full.relative_to(root).as_posix()
                key = os.path.splitext(full.relative_to(folder).as_posix())[0]
                self.by_key.setdefault(key, rel_root)
                self.by_stem.setdefault(os.path.splitext(fn)[0], rel_root)
        self.prefix = folder.relative_to(root).as_posix() if folder != root else ""

    def expected(self, name: str) -> str:
        """Where a listed-but-missing file would be, relative to ROOT (for the ``missing`` report)."""
        return f"{self.prefix}/{name}" if self.prefix else name


def _place(
    index: DatasetIndex, files: _VideoFiles, rel: str, label: int, by_stem: bool, **segment: int | None
) -> None:
    """Adds the clip listed as ``rel`` to the records, or to ``missing`` when no file matches it.

    A listed path that is absolute or leaves ROOT goes to ``refused`` before any look-up.
    """
    rel = normalise_clip_path(rel)
    listed = rel if os.path.isabs(rel) else files.expected(rel)
    if clip_path_error(listed) is not None:
        index.refused.append(ClipRecord(listed, label, **segment))
        return
    stem_or_key = os.path.splitext(Path(rel).name if by_stem else rel)[0]
    found = (files.by_stem if by_stem else files.by_key).get(stem_or_key)
    if found is None:
        index.missing.append(ClipRecord(files.expected(rel), label, **segment))
    else:
        index.records.append(ClipRecord(found, label, **segment))


# ---------------------------------------------------------------------------------------------- readers


def _read_smarthome(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """Toyota Smarthome: split by subject (CS) or camera (CV1/CV2) from the file name."""
    protocol = str(cfg.protocol)
    classes = list(SMARTHOME_CS_CLASSES if protocol == "cs" else SMARTHOME_CV_CLASSES)
    class_index = {c: i for i, c in enumerate(classes)}
    folder = _first_dir(root, cfg.video_dir, _VIDEO_DIRS["smarthome"], split)
    index = DatasetIndex("smarthome", split, protocol, root, classes)
    skipped: Counter[str] = Counter()
    entries = folder.iterdir() if isinstance(folder, BucketPath) else os.scandir(folder)
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.is_dir() or not _is_video(entry.name):
            continue
        match = _SMARTHOME_NAME.match(os.path.splitext(entry.name)[0])
        if match is None:
            skipped["name not <Activity>_pPP_rRR_vVV_cCC"] += 1
            continue
        if protocol == "cs":
            in_split = int(match["person"]) in SMARTHOME_CS_SUBJECTS[split]
        else:
            in_split = int(match["camera"]) in SMARTHOME_CV_CAMERAS[protocol][split]
        if not in_split:
            continue
        activity = match["activity"]
        if activity not in class_index:
            skipped[f"activity {activity} not in {protocol.upper()} classes"] += 1
            continue
        rel = (folder / entry.name).relative_to(root).as_posix()
        # a dangling symbolic link is a listed-but-absent file: reported, and recorded as failed
        (index.records if entry.is_file() else index.missing).append(ClipRecord(rel, class_index[activity]))
    index.skipped = dict(skipped)
    return index


_K400_SPLIT_NAMES = {"train": ("train",), "val": ("val", "validate", "validation"), "test": ("test",)}


def _read_k400(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """Kinetics-400: ``<split>.csv`` rows -> ``<youtube_id>_<start:06d>_<end:06d>`` files, found by name.

    The release names its validation split ``validate`` (``validate.csv``); ``val`` and ``validation``
    are found too, for the CSV and the video folder. Class indices are positions in the canonical
    400-class list (``k400_classes``), whichever CSVs are present; a label outside it is refused.
    """
    names = _K400_SPLIT_NAMES[split]
    path = _find_annotation(root, cfg, [f"{n}.csv" for n in names], split)
    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
    needed = {"youtube_id", "time_start", "time_end"}
    if not needed <= {f.strip() for f in reader.fieldnames or ()}:
        raise ValueError(f"{path}: expected columns label,youtube_id,time_start,time_end,split")
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    classes = list(KINETICS400_CLASSES)
    class_index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(
        {label for r in rows if (label := (r.get("label") or "").strip()) and label not in class_index}
    )
    if unknown:
        raise ValueError(
            f"{path}: label(s) {unknown[:3]}{' ...' if len(unknown) > 3 else ''} are not among "
            f"Kinetics-400's 400 classes ({len(unknown)} unknown); a Kinetics-600/700 file? Use the list "
            "dataset for it"
        )
    videos = tuple(d.format(split=n) for n in names for d in _VIDEO_DIRS["k400"])
    files = _VideoFiles(root, _first_dir(root, cfg.video_dir, videos, split))
    index = DatasetIndex("k400", split, None, root, classes)
    skipped: Counter[str] = Counter()
    for row in rows:
        label = (row.get("label") or "").strip()
        if not label:
            skipped["no label in csv"] += 1
            continue
        try:
            stem = (
                f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
            )
        except (TypeError, ValueError):
            skipped["bad time_start/time_end"] += 1
            continue
        _place(index, files, f"{stem}.mp4", class_index[label], by_stem=True)
    index.skipped = dict(skipped)
    return index


def _read_ssv2(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """Something-Something v2: label = ``labels.json`` index of the template with ``[`` ``]`` removed.

    The ``test`` split's json holds ids only; its labels come from ``test-answers.csv`` (``id;label``)
    when present, else the clips are unlabelled (-1).
    """
    labels_path = _find_annotation(root, cfg, ["labels.json", "something-something-v2-labels.json"], split)
    split_path = _find_annotation(root, cfg, ["{split}.json", "something-something-v2-{split}.json"], split)
    templates = _read_json(labels_path)
    if not isinstance(templates, dict):
        raise ValueError(f"{labels_path}: expected a mapping template -> index")
    template_index = {t: int(i) for t, i in templates.items()}
    classes = [t for t, _ in sorted(template_index.items(), key=lambda kv: kv[1])]
    if [template_index[c] for c in classes] != list(range(len(classes))):
        raise ValueError(f"{labels_path}: class indices are not 0..{len(classes) - 1}")
    entries = _read_json(split_path)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
        raise ValueError(f"{split_path}: expected a list of objects with an 'id'")
    answers = _ssv2_answers(root, cfg, split) if split == "test" else {}
    files = _VideoFiles(root, _first_dir(root, cfg.video_dir, _VIDEO_DIRS["ssv2"], split))
    index = DatasetIndex("ssv2", split, None, root, classes)
    skipped: Counter[str] = Counter()
    for entry in entries:
        template = entry.get("template", answers.get(str(entry["id"])))
        if template is None:  # the test split without answers: unlabelled clips
            _place(index, files, f"{entry['id']}.webm", -1, by_stem=True)
            continue
        template = str(template).replace("[", "").replace("]", "")
        if template not in template_index:
            skipped["template not in labels.json"] += 1
            continue
        _place(index, files, f"{entry['id']}.webm", template_index[template], by_stem=True)
    index.skipped = dict(skipped)
    return index


def _ssv2_answers(root: Path | BucketPath, cfg: DatasetConfig, split: str) -> dict[str, str]:
    """``test-answers.csv`` (``id;label`` lines) as id -> label, or {} when the file is absent."""
    try:
        path = _find_annotation(
            root, cfg, ["test-answers.csv", "something-something-v2-test-answers.csv"], split
        )
    except FileNotFoundError:
        return {}
    answers = {}
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if line.strip():
            clip_id, sep, label = line.partition(";")
            if not sep:
                raise ValueError(f"{path}:{number}: expected 'id;label', got {line.strip()!r}")
            answers[clip_id.strip()] = label.strip()
    return answers


def _read_json(path: Path | BucketPath) -> object:
    """A JSON annotation file (any encoding ``read_text_file`` reads); a syntax error names the file."""
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_ucf101(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """UCF101: ``classInd.txt`` and ``{train,test}list0N.txt``; test labels from the folder name."""
    class_path = _find_annotation(root, cfg, ["classInd.txt"], split)
    numbered = [line.split() for line in read_text_file(class_path).splitlines() if line.strip()]
    try:
        classes = [name for _, name in sorted(((int(i), n) for i, n in numbered), key=lambda x: x[0])]
    except ValueError as e:
        raise ValueError(f"{class_path}: expected lines '<index> <ClassName>': {e}") from e
    class_index = {c: i for i, c in enumerate(classes)}
    folded = {c.lower(): i for i, c in enumerate(classes)}
    list_path = _find_annotation(root, cfg, [f"{split}list0{cfg.protocol}.txt"], split)
    files = _VideoFiles(root, _first_dir(root, cfg.video_dir, _VIDEO_DIRS["ucf101"], split))
    index = DatasetIndex("ucf101", split, str(cfg.protocol), root, classes)
    skipped: Counter[str] = Counter()
    for line in read_text_file(list_path).splitlines():
        parts = line.split()
        if not parts:
            continue
        rel = parts[0]
        if len(parts) > 1:
            if not parts[1].isdigit():
                raise ValueError(f"{list_path}: expected '<Class>/<file> <index>', got {line!r}")
            label = int(parts[1]) - 1
        else:
            folder = rel.split("/")[0]
            label = class_index.get(folder, folded.get(folder.lower(), -1))
        if not 0 <= label < len(classes):
            skipped["class not in classInd.txt"] += 1
            continue
        _place(index, files, rel, label, by_stem=False)
    index.skipped = dict(skipped)
    return index


def _read_hmdb51(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """HMDB51: ``<class>_test_split<N>.txt`` lines ``<name>.avi <0|1|2>`` (1 train, 2 test, 0 unused)."""
    split_dir = _first_dir(root, cfg.annotation_dir, _ANNOTATION_DIRS["hmdb51"], split)
    split_files = {}
    for p in sorted(split_dir.iterdir()):
        match = _HMDB_SPLIT_FILE.match(p.name)
        if match and match["split"] == cfg.protocol:
            split_files[match["cls"]] = p
    if not split_files:
        raise FileNotFoundError(f"hmdb51: no <class>_test_split{cfg.protocol}.txt files in {split_dir}")
    classes = sorted(split_files)
    wanted = "1" if split == "train" else "2"
    files = _VideoFiles(root, _first_dir(root, cfg.video_dir, _VIDEO_DIRS["hmdb51"], split))
    index = DatasetIndex("hmdb51", split, str(cfg.protocol), root, classes)
    skipped: Counter[str] = Counter()
    for label, cls in enumerate(classes):
        for line in read_text_file(split_files[cls]).splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            if parts[1] == "0":
                skipped[f"unused in split {cfg.protocol}"] += 1
            elif parts[1] == wanted:
                name = parts[0] if os.path.isabs(parts[0]) else f"{cls}/{parts[0]}"
                _place(index, files, name, label, by_stem=False)
    index.skipped = dict(skipped)
    return index


def _read_diving48(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """Diving48 V2: ``Diving48_V2_<split>.json`` entries with label and frame segment; ``rgb/<vid>.mp4``."""
    split_path = _find_annotation(root, cfg, ["Diving48_V2_{split}.json"], split)
    entries = _read_json(split_path)
    try:
        vocab = _read_json(_find_annotation(root, cfg, ["Diving48_vocab.json"], split))
        classes = [" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in vocab]
    except FileNotFoundError:
        classes = [f"class_{i:02d}" for i in range(DIVING48_NUM_CLASSES)]
    files = _VideoFiles(root, _first_dir(root, cfg.video_dir, _VIDEO_DIRS["diving48"], split))
    index = DatasetIndex("diving48", split, None, root, classes)
    skipped: Counter[str] = Counter()
    for entry in entries:
        label = int(entry["label"])
        if not 0 <= label < len(classes):
            skipped[f"label outside 0..{len(classes) - 1}"] += 1
            continue
        segment = {"start_frame": entry.get("start_frame"), "end_frame": entry.get("end_frame")}
        segment = {k: None if v is None else int(v) for k, v in segment.items()}
        _place(index, files, f"{entry['vid_name']}.mp4", label, by_stem=True, **segment)
    index.skipped = dict(skipped)
    return index


def _read_folder(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    """Users' own data: ``ROOT/{train,val,test}/<class>/<video>``; classes: sorted folder names."""

    def split_dir(s: str) -> Path | BucketPath | None:
        for name in (s, _SPLIT_ALIASES.get(s, s)):
            if (root / name).is_dir():
                return root / name
        return None

    class_names: set[str] = set()
    for s in SPLITS["folder"]:
        d = split_dir(s)
        if d is not None:
            class_names.update(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    folder = split_dir(split)
    if folder is None:
        raise FileNotFoundError(
            f"folder dataset: {root / split} is not a directory (expected ROOT/{split}/<class>/)"
        )
    classes = sorted(class_names)
    index = DatasetIndex("folder", split, None, root, classes)
    skipped: Counter[str] = Counter()
    for label, cls in enumerate(classes):
        class_dir = folder / cls
        if not class_dir.is_dir():
            continue
        for p in sorted(class_dir.iterdir()):
            if p.is_dir():
                continue
            if not _is_video(p.name):
                skipped["not a video file extension"] += 1
            elif p.is_file():
                index.records.append(ClipRecord(p.relative_to(root).as_posix(), label))
            else:  # a dangling symbolic link: reported as missing, recorded as failed by extraction
                index.missing.append(ClipRecord(p.relative_to(root).as_posix(), label))
    index.skipped = dict(skipped)
    return index


def _read_list(root: Path | BucketPath, split: str, cfg: DatasetConfig) -> DatasetIndex:
    from stage1_extract.videos.list_dataset import read_list

    return read_list(root, split, cfg)


_READERS = {
    "smarthome": _read_smarthome,
    "k400": _read_k400,
    "ssv2": _read_ssv2,
    "ucf101": _read_ucf101,
    "hmdb51": _read_hmdb51,
    "diving48": _read_diving48,
    "folder": _read_folder,
    "list": _read_list,
}

"""Datasets on object storage: ``--root s3://bucket/prefix``, read with the stores' client (store/objects.py).

A dataset root on an S3-compatible bucket is listed once, with one paginated LIST of its prefix, when a
reader first asks about it; ``BucketPath`` answers the dataset readers' questions (``is_file``, ``is_dir``,
``iterdir``, ``walk``, ``read_bytes``, ``/``) from that listing, so every reader works on it unchanged. A
video is fetched whole into memory with one GET (``clip_source``) and decoded from its bytes
(``VideoBytes``: PyAV and decord both read file-like objects). Credentials, region and endpoint come from
the standard AWS places, as for stores; only URLs are ever recorded. Paths keep the local rules: nothing
absolute, nothing leaving the root.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from stage1_extract.videos.clip_paths import PathOutsideRoot, clip_path_error, resolve_clip_path
from store.objects import ObjectIO, StoreURL, is_url


@dataclass(frozen=True)
class VideoBytes:
    """A video held in memory (fetched from an object store), named by its URL; each decoder reads it from
    a fresh ``BytesIO``."""

    url: str
    data: Any  # bytes or any buffer (obstore's Bytes)

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)

    def __str__(self) -> str:
        return self.url


def video_input(path: str | Path | VideoBytes) -> str | io.BytesIO:
    """What PyAV's ``av.open`` and decord's ``VideoReader`` take: a file name, or the bytes as a file."""
    return path.open() if isinstance(path, VideoBytes) else str(path)


@dataclass
class _Listing:
    """Every object under one root prefix (listed on first use), as folders of files; ``shallow``: the
    prefix's own level only (the folder of an annotation file given on its own)."""

    objects: ObjectIO
    shallow: bool = False
    files: set[str] = field(default_factory=set)
    folders: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)  # key -> (folders, files)
    listed: bool = False

    def folder(self, key: str) -> tuple[set[str], set[str]] | None:
        if not self.listed:
            if self.shallow:
                folders, files = self.objects.list_folder()
                self.folders[""] = (set(folders), set())
                for name in files:
                    self._add(name)
            else:
                for meta in self.objects.list():
                    self._add(str(meta["path"]))
            self.listed = True
        return self.folders.get(key)

    def _add(self, key: str) -> None:
        parts = key.split("/")
        if not all(parts):  # "folder/" markers of consoles, empty segments: not files
            return
        self.files.add(key)
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            entry = self.folders.setdefault(parent, (set(), set()))
            (entry[1] if depth == len(parts) - 1 else entry[0]).add(parts[depth])


class BucketPath:
    """A file or folder under a dataset root on object storage: the part of ``pathlib.Path``'s interface the
    dataset readers use, answered from the root's listing (``read_bytes`` is one GET)."""

    def __init__(self, root: StoreURL, listing: _Listing, key: str = "") -> None:
        self.root, self._listing, self.key = root, listing, key

    def __truediv__(self, other: str) -> BucketPath:
        key = posixpath.normpath(posixpath.join(self.key, str(other))) if other else self.key
        key = "" if key == "." else key
        error = clip_path_error(key) if key else None
        if posixpath.isabs(str(other)) or error:
            raise PathOutsideRoot(f"{self.root}: {other!r} is absolute or leaves the dataset root; refused")
        return BucketPath(self.root, self._listing, key)

    def __str__(self) -> str:
        return str(self.root / self.key) if self.key else str(self.root)

    def __repr__(self) -> str:
        return f"BucketPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BucketPath) and (self.root, self.key) == (other.root, other.key)

    def __hash__(self) -> int:
        return hash((self.root, self.key))

    def __lt__(self, other: BucketPath) -> bool:
        return (str(self.root), self.key) < (str(other.root), other.key)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> BucketPath:
        return BucketPath(self.root, self._listing, posixpath.dirname(self.key))

    def relative_to(self, other: BucketPath) -> PurePosixPath:
        if other.key and not self.key.startswith(other.key + "/") and self.key != other.key:
            raise ValueError(f"{self} is not inside {other}")
        return PurePosixPath(self.key[len(other.key) :].lstrip("/") or ".")

    def is_file(self) -> bool:
        self._listing.folder("")
        return self.key in self._listing.files

    def is_dir(self) -> bool:
        return self._listing.folder(self.key) is not None

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator[BucketPath]:
        folders, files = self._listing.folder(self.key) or (set(), set())
        for name in sorted(folders | files):
            yield self / name

    def walk(self) -> Iterator[tuple[BucketPath, list[str], list[str]]]:
        """Like ``os.walk`` (top-down; ``dirnames`` may be edited in place to prune or order the walk)."""
        entry = self._listing.folder(self.key)
        if entry is None:
            return
        dirnames, filenames = sorted(entry[0]), sorted(entry[1])
        yield self, dirnames, filenames
        for name in dirnames:
            yield from (self / name).walk()

    def read_bytes(self) -> bytes:
        data = self._listing.objects.get(self.key) if self.key else None
        if data is None:
            raise FileNotFoundError(f"{self}: no such object")
        return bytes(data)


def location(path: str | Path) -> Path | BucketPath:
    """A dataset root: a local ``Path``, or a ``BucketPath`` for an ``s3://`` URL (listed on first use)."""
    if not is_url(path):
        return Path(path)
    url = StoreURL.parse(str(path), whole_bucket=True)
    return BucketPath(url, _Listing(ObjectIO(url)))


def annotation_location(path: str | Path) -> Path | BucketPath:
    """An annotation file given on its own (``--annotations``): a local path, or an ``s3://`` object seen
    through a listing of its folder's own level (the file and a ``classes.txt`` beside it)."""
    if not is_url(path):
        return Path(path)
    url = StoreURL.parse(str(path))
    parent, _, name = url.prefix.rpartition("/")
    folder = StoreURL(url.bucket, parent)
    return BucketPath(folder, _Listing(ObjectIO(folder), shallow=True)) / name


def walk(folder: Path | BucketPath) -> Iterator[tuple[Path | BucketPath, list[str], list[str]]]:
    """``os.walk`` of a local folder (its paths as ``Path``) or of a folder under an object-store root."""
    if isinstance(folder, BucketPath):
        yield from folder.walk()
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        yield Path(dirpath), dirnames, filenames


def worker_start_method(root: str | Path | None, num_workers: int) -> str | None:
    """How DataLoader workers reading videos under ``root`` start: ``spawn`` under an object-store root
    (its client's threads do not survive ``fork()``), else the platform's default."""
    return "spawn" if root is not None and is_url(root) and num_workers > 0 else None


def clip_name(root: str | Path, rel: str) -> str:
    """How a clip is named in messages: its URL under an object-store root, else ROOT/rel."""
    return f"{str(root).rstrip('/')}/{rel}" if is_url(root) else str(Path(root) / rel)


def clip_source(root: str | Path, rel: str, max_bytes: int) -> Path | VideoBytes:
    """Where clip ``rel`` (relative to ``root``) is decoded from: ROOT/rel on disk, or its bytes fetched with
    one GET from an object-store root. A path leaving the root raises ``PathOutsideRoot``; an absent,
    forbidden or too large object the errors a local file gives (``FileNotFoundError``, ``PermissionError``,
    ``ValueError``), naming its URL; a failing endpoint or credential a ``StoreError``."""
    if not is_url(root):
        return resolve_clip_path(root, rel)
    error = clip_path_error(rel)
    if error is not None:
        raise PathOutsideRoot(f"{rel!r}: {error} ({root}); refused")
    url = StoreURL.parse(str(root), whole_bucket=True)
    key = posixpath.normpath(rel)
    return VideoBytes(str(url / key), ObjectIO(url).read_object(key, max_bytes))

"""Atomic, durable file writes: every file the project writes appears whole or not at all.

A file is written under a hidden temporary name in its own folder (``.NAME.PID.partial``), flushed and
fsynced, renamed over ``NAME`` with ``os.replace`` (atomic on POSIX), and the folder is fsynced so the
rename survives power loss. A reader sees the old file or the new one; a writer that dies leaves at most
the temporary file, and an error removes it. Stage 1 and stage 2 use it too (they may import ``store``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path, up_to: Path | None = None) -> None:
    """fsyncs a file (if it exists) and its parent folders up to ``up_to`` so renames survive power loss."""
    targets = [path] if path.exists() else []
    parent = path.parent
    while True:
        targets.append(parent)
        if up_to is None or parent == up_to or parent == parent.parent:
            break
        parent = parent.parent
    for p in targets:
        fsync_file(p)


def fsync_folders(folder: Path, up_to: Path) -> None:
    """fsyncs ``folder`` and its parents up to ``up_to`` (inside it or equal): the names created in them."""
    while True:
        fsync_file(folder)
        if folder == up_to or folder == folder.parent:
            return
        folder = folder.parent


def fsync_file(path: Path) -> None:
    """fsyncs one file (its contents) or folder (the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsyncs every file and folder under ``root`` (a freshly built store, before its rename)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath) / ".")


def temp_path(path: Path) -> Path:
    """The hidden temporary name beside ``path`` that this process writes before renaming onto ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def rename_into_place(path: Path) -> None:
    """Renames this process's temp file of ``path`` onto ``path`` (atomic): ``atomic_path``'s last step, for
    a writer that makes several temp files durable first and renames them in an order of its own."""
    os.replace(temp_path(path), path)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` for any writer that takes a path (``torch.save``,
    ``safetensors``, ``h5py``, ``savefig``); when the block ends without error it is renamed onto ``path``.

    Writers must not infer the format from the suffix (the temporary name ends in ``.partial``).
    ``durable=False`` skips the fsyncs (still atomic; for data that can be regenerated, e.g. test videos).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        rename_into_place(path)
        if durable:
            fsync_file(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically and durably; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Writes ``text`` to ``path`` atomically and durably; returns the path."""
    return write_bytes_atomic(path, text.encode(encoding))

"""Clip paths from annotation files stay inside the dataset root.

Annotation files are input like any other: a line ``../../outside.mp4 1`` or ``/etc/passwd 1`` must not
make amflow open a file outside ``--root``. The check is on the path's text (absolute, or leading out of
the root once ``.`` and ``..`` are resolved), not on the file system, so symbolic links that a user put
*inside* the root (e.g. ``ROOT/videos -> /mnt/disk/videos``) are followed as usual.
"""

from __future__ import annotations

import posixpath
from pathlib import Path


class PathOutsideRoot(ValueError):
    """A clip path that is absolute or leaves the dataset root (recorded as the clip's failure type)."""


def clip_path_error(rel: str) -> str | None:
    """Why the clip path ``rel`` (relative to the dataset root) is refused, or None when it stays inside."""
    if not rel or "\0" in rel:
        return "empty path or NUL byte"
    if posixpath.isabs(rel):
        return "absolute path; clip paths are relative to the dataset root"
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        return "leaves the dataset root"
    return None


def normalise_clip_path(rel: str) -> str:
    """One spelling per file: ``./a//b.mp4``, ``a\\b.mp4`` (a Windows editor) and ``a/x/../b.mp4`` are all
    ``a/b.mp4``, so two spellings of one video are one clip (and a duplicate when listed twice)."""
    rel = rel.strip().replace("\\", "/")
    if not rel:
        return rel
    norm = posixpath.normpath(rel)
    return "" if norm == "." else norm


def resolve_clip_path(root: str | Path, rel: str) -> Path:
    """``root / rel``, or ``PathOutsideRoot`` naming the path when ``rel`` is absolute or leaves ``root``."""
    error = clip_path_error(rel)
    if error is not None:
        raise PathOutsideRoot(f"{rel!r}: {error} ({root}); refused")
    return Path(root) / rel

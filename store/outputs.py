"""Output paths, checked before any work: a command never destroys what exists.

Every command names what it will write (``Output``) and what it reads (``Input``); ``check_outputs``
refuses, in one line and before anything is created, an output that exists (unless replaced on purpose or
continued), whose folder cannot be written, that is (or holds, or lies inside) one of the inputs, or that
two outputs share. Paths are compared resolved (symlinks, ``..``) and, where both exist, by identity (hard
links). Remote URLs (``s3://...``) are compared by name only. Used by every ``amflow`` command.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class OutputError(ValueError):
    """An output path that would destroy something, cannot be written, or collides with another path."""


@dataclass(frozen=True)
class Output:
    """A path a command writes.

    ``option`` names it as the user gave it (``--out``, ``--onnx``, ``--out (timeline of a.mp4)``);
    ``replace``: the user allowed replacing an existing one (``--overwrite``); ``resumable``: an existing
    one is continued or checked by the command itself (a store being extracted, a run, a sweep folder);
    ``folder``: a folder rather than a file.
    """

    option: str
    path: str | Path
    replace: bool = False
    resumable: bool = False
    folder: bool = False


@dataclass(frozen=True)
class Input:
    """A path a command reads (a file or a folder); ``None`` paths are ignored by ``check_outputs``."""

    option: str
    path: str | Path | None


def is_url(path: str | Path) -> bool:
    """A remote location (``s3://bucket/key``, ``gs://``, ``http://``): no local file-system checks."""
    return "://" in str(path)


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a == b


def _same_key(a: Path | str, b: Path | str) -> bool:
    if isinstance(a, Path) and isinstance(b, Path):
        return _same(a, b)
    return a == b


def _inside(inner: Path, outer: Path) -> bool:
    """``inner`` lies strictly inside the folder ``outer``."""
    return inner != outer and outer in inner.parents


def _check_writable(out: Output, path: Path) -> None:
    """The nearest existing folder on the way to ``path`` must be a folder this process may write."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out.option} {out.path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{out.option} {out.path}: {parent} is not writable (read-only file system or permissions)"
        )


def _check_one(out: Output, path: Path) -> None:
    if path.exists():
        if out.folder and not path.is_dir():
            raise OutputError(f"{out.option} {out.path}: is a file, not a folder")
        if not out.folder and path.is_dir():
            raise OutputError(f"{out.option} {out.path}: is a folder; give a file name")
        if not (out.replace or out.resumable):
            raise OutputError(f"{out.option} {out.path}: exists (pass --overwrite to replace it)")
    _check_writable(out, path)


def check_outputs(outputs: Sequence[Output], inputs: Sequence[Input] = ()) -> None:
    """Refuses (``OutputError``, one line) outputs that would destroy an input, an existing file or each
    other, or that cannot be written; creates nothing."""
    local_in = [(i.option, i.path, _resolved(i.path)) for i in inputs if i.path and not is_url(i.path)]
    remote_in = [(i.option, str(i.path)) for i in inputs if i.path and is_url(i.path)]
    seen: list[tuple[Output, Path | str]] = []
    for out in outputs:
        if is_url(out.path):
            key: Path | str = str(out.path).rstrip("/")
            for option, name in remote_in:
                if name.rstrip("/") == key:
                    raise OutputError(f"{out.option} {out.path}: is also the input {option}; write elsewhere")
        else:
            key = _resolved(out.path)
            _check_one(out, key)
            for option, given, path in local_in:
                if _same(key, path):
                    raise OutputError(f"{out.option} {out.path}: is also the input {option}; write elsewhere")
                if _inside(key, path) and key.exists() and not out.resumable:  # continued, not replaced
                    raise OutputError(
                        f"{out.option} {out.path}: would replace a file of the input {option} {given}; "
                        "write elsewhere"
                    )
                if _inside(path, key) and key.exists() and not out.resumable:
                    raise OutputError(
                        f"{out.option} {out.path}: holds the input {option} {given}; write elsewhere"
                    )
        for other, other_key in seen:
            if _same_key(key, other_key):
                raise OutputError(
                    f"{out.option} {out.path} and {other.option} {other.path}: the same file; "
                    "give each its own path"
                )
        seen.append((out, key))

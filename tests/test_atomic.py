"""foundation.atomic: files appear whole or not at all, and durably; the project's one way to write them."""

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from foundation.atomic import atomic_path, write_bytes_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_writes_replace_whole_files_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "config.yaml"
    assert write_text_atomic(target, "a: 1\n") == target  # the folder is created
    assert target.read_text() == "a: 1\n"
    write_bytes_atomic(target, b"a: 2\n")
    assert target.read_bytes() == b"a: 2\n" and leftovers(target.parent) == []


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def _die_while_writing(target: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "resume.pt"
    target.write_text("old")
    child = multiprocessing.get_context("fork").Process(target=_die_while_writing, args=(str(target),))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert target.read_text() == "old"
    assert [p.endswith(".partial") for p in leftovers(tmp_path)] == [True]  # only a hidden temporary


def test_the_file_and_its_folder_are_fsynced_unless_not_durable(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "best.safetensors"
    write_bytes_atomic(target, b"x")
    assert synced == [target.stat().st_ino, tmp_path.stat().st_ino]  # the data, then the rename
    synced.clear()
    with atomic_path(tmp_path / "clip.mp4", durable=False) as tmp:
        tmp.write_bytes(b"y")
    assert synced == [] and (tmp_path / "clip.mp4").read_bytes() == b"y"


def test_writers_of_the_project_go_through_it(tmp_path, monkeypatch):
    from foundation import formats

    target = tmp_path / "best.safetensors"
    formats.write_safetensors({"w": torch.ones(2)}, target, {"format": "x"})
    before = target.read_bytes()

    def dies_half_way(tensors, path, metadata):
        Path(path).write_bytes(before[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        formats.write_safetensors({"w": torch.zeros(2)}, target, {"format": "x"})
    assert target.read_bytes() == before and leftovers(tmp_path) == []
    # No other hand-rolled rename-into-place is left in the packages.
    for package in ("stage1_extract", "stage2_temporal", "store", "amflow"):
        for path in (ROOT / package).rglob("*.py"):
            if path != ROOT / "store" / "atomic.py":
                assert "os.replace(" not in path.read_text(), path

"""The demo is the same on every run (issue 21 s7), tested as a user sees it: two fresh ``amflow demo``
runs into two new folders, with other thread settings in their environments, write the same
``results.json`` byte for byte; a re-run that reuses the first run's stores writes it again. ``--smoke``
keeps the whole pipeline (generation, extraction, training, evaluation, predict) to seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from stage2_temporal.training import tensorboard


def amflow(*args: str, threads: str) -> subprocess.Popen:
    """Starts the console script as a user would, with ``threads`` in its environment."""
    exe = shutil.which("amflow") or str(Path(sys.executable).with_name("amflow"))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished(run: subprocess.Popen) -> str:
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    return out


def test_two_fresh_demo_runs_write_the_same_results(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    runs = [amflow("demo", "--smoke", "--out", str(first), threads="2")]  # both at once: half the wait
    runs.append(amflow("demo", "--smoke", "--out", str(second), threads="1"))
    shown = finished(runs[0])
    finished(runs[1])
    results = (first / "results.json").read_bytes()
    assert (second / "results.json").read_bytes() == results
    assert str(tmp_path) not in results.decode()  # paths relative to the demo's folder
    assert f"$ cd {first} && amflow predict videos_static/test/left/left_0000.mp4" in shown
    # a re-run reuses the stores (stage 2 only, which once trained with another thread count)
    (first / "results.json").unlink()
    finished(amflow("demo", "--smoke", "--out", str(first), threads="1"))
    assert (first / "results.json").read_bytes() == results


def test_a_missing_tensorboard_is_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when absent
    tensorboard._note_missing_tensorboard.cache_clear()
    with caplog.at_level(logging.INFO, logger="stage2_temporal.training.tensorboard"):
        for run in ("a", "b", "c"):
            board = tensorboard.EpochLogger(tmp_path / run)
            assert board.writer is None
    notes = [r for r in caplog.records if "tensorboard is not installed" in r.message]
    assert len(notes) == 1
    tensorboard._note_missing_tensorboard.cache_clear()

"""TensorBoard event files in a run directory: one scalar per curve column per epoch (when installed).

``train-heads``, ``sweep`` and ``finetune`` log the same rows they write to ``curve.csv``: losses, the
learning rate and the validation metrics, under ``train/...``, ``val/...`` and ``lr``. Without the
``tensorboard`` package (the optional extra ``amflow[tensorboard]``) nothing is written and the run goes on.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


def scalar_tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``, ``val_top1`` -> ``val/top1``; other keys unchanged."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return key


@functools.cache
def _note_missing_tensorboard() -> None:
    """Says once per process, not once per trained run, that no event files are written."""
    log.info("tensorboard is not installed: no event files (pip install 'amflow[tensorboard]')")


class EpochLogger:
    """Writes each epoch's numeric curve values as TensorBoard scalars into ``run_dir``.

    Disabled (a no-op) when ``enabled`` is False or the ``tensorboard`` package is missing. ``fresh``
    deletes the event files of an earlier run in that directory first (a retrained or overwritten run).
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, fresh: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        if fresh:
            for old in Path(run_dir).glob("events.out.tfevents.*"):
                old.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _note_missing_tensorboard()
            return
        self.writer = SummaryWriter(log_dir=str(run_dir))

    def log(self, row: Mapping[str, Any], epoch: int) -> None:
        """One epoch's row (``epoch`` itself is the step, not a scalar)."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(scalar_tag(key), float(value), epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> EpochLogger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

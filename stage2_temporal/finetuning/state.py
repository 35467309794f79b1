"""A finetuning run's resumable state and its run directory: what ``resume.pt`` and ``steps.csv`` hold, how
they are written (temp file, then rename) and read back, and the checks before a run starts or resumes.

``resume.pt`` is ``{"format", "state": FinetuneState as a dict, "optimizer": its state dict}`` and loads
with ``torch.load(weights_only=True)``. The learning rate is a function of the step (``schedule.py``), so
no scheduler state is kept. Files of the first format (one flat dict with the state's keys, the optimiser
and a ``LambdaLR`` state) are converted when read.
"""

from __future__ import annotations

import csv
import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from foundation.atomic import atomic_path
from foundation.config import ConfigError, read_yaml
from stage1_extract.methods.checkpoint import CheckpointError
from stage2_temporal.finetuning.plan import FinetunePlan, run_config_differences
from stage2_temporal.heads import drop_ignored_head_keys
from stage2_temporal.training.checks import check_out_dir
from stage2_temporal.training.run_dir import CONFIG_FILE, METRICS_FILE

LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
RESUME_FILE = "resume.pt"
STEPS_FILE = "steps.csv"
RESUME_FORMAT = "amflow-finetune-resume-2"
RESUME_FORMAT_V1 = "amflow-finetune-resume-1"  # flat dict; converted on load
RUN_FILES = (
    CONFIG_FILE,
    LAST_FILE,
    BEST_FILE,
    RESUME_FILE,
    STEPS_FILE,
    METRICS_FILE,
    "curve.csv",
    "curve.png",
    "confusion_val.csv",
    "confusion_val.png",
)


@dataclass
class FinetuneState:
    """Where a run stands: position, the current epoch's running sums, the curve and the best epoch."""

    epoch: int = 0  # epochs finished (validated)
    step_in_epoch: int = 0  # optimiser steps done in the current epoch
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # summed training loss of the current epoch so far
    epoch_correct: float = 0.0  # correctly classified training clips of the current epoch so far
    epoch_clips: float = 0.0  # training clips of the current epoch so far
    curve: list[dict[str, Any]] = field(default_factory=list)  # one row per validated epoch
    best_score: float = -1.0  # best validation mean class accuracy so far
    best_epoch: int = 0
    best_metrics: dict[str, Any] | None = None  # the best epoch's validation metrics
    train_seconds: float = 0.0  # time spent in optimiser steps
    seconds: float = 0.0  # wall time of the run, validation included
    failed_train_clips: int = 0

    def start_epoch(self) -> None:
        """Moves to the next epoch: its step count and running sums start at zero."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = self.epoch_correct = self.epoch_clips = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> FinetuneState:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"{path}: unknown resume state keys {unknown}")
        return cls(**data)


def save_resume_state(state: FinetuneState, optimizer: dict[str, Any], path: str | Path) -> None:
    """Writes ``resume.pt`` atomically and durably (``foundation.atomic``)."""
    with atomic_path(path) as tmp:
        torch.save({"format": RESUME_FORMAT, "state": dataclasses.asdict(state), "optimizer": optimizer}, tmp)


def load_resume_state(path: str | Path) -> tuple[FinetuneState, dict[str, Any]]:
    """Reads ``resume.pt`` with ``weights_only=True``: (the state, the optimiser's state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resume state (the run never finished an epoch or a save point)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # never weights_only=False
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a resume state amflow wrote (refused to load: {first[:200]}); start the run "
            "again with --overwrite"
        ) from e
    fmt = saved.get("format") if isinstance(saved, dict) else None
    if fmt == RESUME_FORMAT:
        return FinetuneState.from_dict(saved["state"], path), saved["optimizer"]
    if fmt == RESUME_FORMAT_V1:
        return convert_v1(saved, path)
    raise CheckpointError(f"{path}: not an amflow finetune resume state (format {RESUME_FORMAT})")


def convert_v1(saved: dict[str, Any], path: Path) -> tuple[FinetuneState, dict[str, Any]]:
    """The first format: one flat dict, the epoch's sums as a list, and a ``LambdaLR`` state (dropped: the
    learning rate is recomputed from the step)."""
    data = {k: v for k, v in saved.items() if k not in ("format", "optimizer", "scheduler", "epoch_sums")}
    loss, correct, clips = saved["epoch_sums"]
    state = FinetuneState.from_dict(
        {**data, "epoch_loss_sum": loss, "epoch_correct": correct, "epoch_clips": clips}, path
    )
    return state, saved["optimizer"]


def regroup_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, params: list) -> dict:
    """A saved optimiser state whose parameter groups differ from ``optimizer``'s, re-keyed to its groups.

    ``params`` lists the parameters in the saved state's order (its indices 0, 1, ...); each parameter's
    per-parameter state (AdamW's moments and step) moves to its index in ``optimizer``'s groups, and the
    groups' settings are ``optimizer``'s own. A state whose groups already match is returned unchanged.
    """
    groups = optimizer.param_groups
    if len(saved["param_groups"]) == len(groups) and all(
        len(a["params"]) == len(b["params"]) for a, b in zip(saved["param_groups"], groups)
    ):
        return saved
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(params):
        raise CheckpointError(
            f"optimizer state: {len(saved_ids)} parameters saved, the model trains {len(params)}"
        )
    new_index, start = {}, 0
    for g in groups:
        for offset, p in enumerate(g["params"]):
            new_index[id(p)] = start + offset
        start += len(g["params"])
    state = {new_index[id(params[saved_ids.index(i)])]: s for i, s in saved["state"].items()}
    current = optimizer.state_dict()["param_groups"]
    return {"state": state, "param_groups": current}


def read_steps(path: Path, up_to: int) -> list[dict[str, Any]]:
    """The rows of ``steps.csv`` up to step ``up_to`` (those a resumed run keeps)."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            if int(r["step"]) <= up_to:
                rows.append(
                    {
                        "step": int(r["step"]),
                        "epoch": int(r["epoch"]),
                        "lr": float(r["lr"]),
                        "loss": float(r["loss"]),
                    }
                )
    return rows


def write_steps(rows: list[dict[str, Any]], path: Path) -> None:
    """``steps.csv``: loss and learning rate per optimiser step."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "lr", "loss"])
        writer.writeheader()
        writer.writerows(rows)


def prepare_run_dir(out: Path, plan: FinetunePlan, resume: bool, overwrite: bool) -> None:
    """Checks RUN_DIR: empty (or ``overwrite``) for a new run; unfinished and same config to ``resume``."""
    check_out_dir(out)
    if resume:
        if (out / METRICS_FILE).is_file():
            raise ValueError(f"--out {out}: the run already finished (metrics.json); nothing to resume")
        if not (out / RESUME_FILE).is_file():
            raise FileNotFoundError(f"--out {out}: no {RESUME_FILE} to resume from")
        stored = read_yaml(out / CONFIG_FILE)  # a broken one is named in one line
        # runs written before each head type had its own config list every type's keys
        stored["model"] = drop_ignored_head_keys(stored.get("model") or {})
        diff = run_config_differences(stored, plan.resolved())
        if diff:
            raise ConfigError(
                f"--resume {out}: the configs differ from the run's {CONFIG_FILE}:\n  " + "\n  ".join(diff)
            )
        return
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"--out {out}: already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --overwrite to start again"
        )

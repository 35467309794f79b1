"""A run directory of stage 2: heads' weights with what rebuilds them, curves, and the completion marker.

A run is finished when ``metrics.json`` exists: it is written last, atomically (temp file + rename), so a
killed run never looks complete and a restarted sweep can trust it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foundation.atomic import atomic_path, write_text_atomic
from foundation.config import build_config, config_to_dict
from foundation.formats import (
    HEADS_RECORD_KEY,
    CheckpointError,
    check_fits,
    load_safetensors,
    read_metadata,
    tensor_shapes,
    write_safetensors,
)
from stage2_temporal.heads import AveragingClassifier, HeadsConfig, build_classifier, drop_ignored_head_keys
from store.layout import FlowBlock

METRICS_FILE = "metrics.json"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.yaml"
FINGERPRINT_FILE = "fingerprint.json"
CURVE_FILE = "curve.csv"
METADATA_KEY = HEADS_RECORD_KEY


@dataclass
class HeadsInfo:
    """Everything that rebuilds an ``AveragingClassifier`` besides its weights (stored with them)."""

    heads: HeadsConfig
    num_classes: int
    adapter_names: list[str]
    embed_dim: int
    cls_dim: int
    flow_block_names: list[str] = dataclasses.field(default_factory=list)
    flow_heads: int = 0
    # per flow block its map geometry (``store.layout.FlowBlock.to_dict``); runs saved before it
    # recorded one ``patch_grid`` and ``num_prefix_tokens`` for all blocks instead
    flow_geometry: list[dict[str, Any]] | None = None
    patch_grid: list[int] | None = None
    num_prefix_tokens: int = 1
    seed: int = 0
    class_names: list[str] | None = None

    def flow_blocks(self) -> list[FlowBlock]:
        """The map geometry of each flow block the heads read (empty without flow-map heads)."""
        if not self.heads.flow_maps:
            return []
        if self.flow_geometry is not None:
            return [FlowBlock.from_dict(b) for b in self.flow_geometry]
        grid = tuple(self.patch_grid) if self.patch_grid else None
        tokens = self.num_prefix_tokens + grid[0] * grid[1] if grid else 1
        block = FlowBlock(self.flow_heads or 1, tokens, grid, self.num_prefix_tokens)
        return [block] * len(self.flow_block_names)

    def build(self) -> AveragingClassifier:
        """A freshly initialised classifier of this shape (the voting layer is seeded by ``seed``)."""
        return build_classifier(
            self.heads,
            num_classes=self.num_classes,
            num_adapters=len(self.adapter_names),
            embed_dim=self.embed_dim,
            cls_dim=self.cls_dim,
            flow_blocks=self.flow_blocks(),
            seed=self.seed,
        )


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object file of a run (``fingerprint.json``, ``metrics.json``); a broken one is named in one
    line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json_atomic(data: Any, path: str | Path) -> Path:
    """Writes JSON atomically and durably (``foundation.atomic``): never half-written."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_heads(classifier: AveragingClassifier, info: HeadsInfo, path: str | Path) -> Path:
    """Saves the classifier's state dict as safetensors (atomically, with its content hash), ``info`` as
    JSON in the metadata."""
    write_safetensors(classifier.state_dict(), path, {METADATA_KEY: json.dumps(config_to_dict(info))})
    return Path(path)


def read_heads_info(path: str | Path) -> HeadsInfo:
    """The ``HeadsInfo`` stored in a ``heads.safetensors`` file's metadata (its class list checked)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no trained heads (expected {HEADS_FILE} from amflow train-heads)")
    meta = read_metadata(path)
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: no '{METADATA_KEY}' metadata; not heads saved by amflow train-heads")
    try:
        record = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata '{METADATA_KEY}' is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: metadata '{METADATA_KEY}' is not a JSON object")
    # Heads saved before each head type had its own config list every type's keys: keep the type's own.
    info = build_config(HeadsInfo, drop_ignored_head_keys(record), f"{path} (metadata)")
    if info.class_names is not None and len(info.class_names) != info.num_classes:
        raise CheckpointError(
            f"{path}: {len(info.class_names)} class names for heads of {info.num_classes} classes"
        )
    return info


def _heads_file(path: str | Path) -> Path:
    path = Path(path)
    path = path / HEADS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained heads (expected {HEADS_FILE} from amflow train-heads)")
    return path


def _load_checked(classifier: torch.nn.Module, path: Path) -> None:
    """Loads verified tensors (hash, finite) that must fit ``classifier`` exactly (one line otherwise)."""
    check_fits(classifier, tensor_shapes(path), path, "the heads")
    classifier.load_state_dict(load_safetensors(path))


def load_heads(path: str | Path) -> tuple[AveragingClassifier, HeadsInfo]:
    """Rebuilds the trained classifier from ``heads.safetensors`` (a file or the run directory)."""
    path = _heads_file(path)
    info = read_heads_info(path)
    with torch.device("meta"):  # the recorded sizes must fit the file's tensors before allocating them
        check_fits(info.build(), tensor_shapes(path), path, "the heads")
    classifier = info.build()
    _load_checked(classifier, path)
    return classifier.eval(), info


def load_heads_into(classifier: torch.nn.Module, path: str | Path) -> None:
    """Loads trained heads into a classifier of the same shape, e.g. ``AMFlowModel.classifier``."""
    _load_checked(classifier, _heads_file(path))


def write_curve(rows: Sequence[Mapping[str, Any]], run_dir: str | Path) -> None:
    """The training curve as ``curve.csv`` (one row per epoch) and ``curve.png``."""
    from stage2_temporal.training.plots import plot_curve

    run_dir = Path(run_dir)
    with atomic_path(run_dir / CURVE_FILE) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_curve(rows, run_dir / "curve.png")


def is_finished(run_dir: str | Path) -> bool:
    """Whether a run directory holds a finished run (its ``metrics.json``)."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's ``metrics.json``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {run_dir} holds no finished run")
    return read_json(path)

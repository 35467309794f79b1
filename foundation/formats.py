"""amflow's own files on disk, defined once: format names, metadata keys, the content hash, and the checks
that treat every such file as untrusted data.

Formats (safetensors; the metadata key ``format`` names them, JSON or YAML records ride in the metadata):
- ``amflow-trainable-1``: what training changed, config as YAML (``stage1_extract.methods.checkpoint``);
- ``amflow-zeroi2v-merged-1``: a merged ZeroI2V model (``amflow merge``);
- ``amflow-predictor-1``: everything ``amflow predict`` needs (``amflow export``), record under
  ``amflow_predictor``;
- a run's ``heads.safetensors`` (no format name): the heads, ``HeadsInfo`` as JSON under ``amflow_heads``.

Every file written here carries ``content_sha256``, the SHA-256 of its tensors (names, dtypes, shapes,
bytes; like pip's and Hugging Face's hashes), checked when it is read: flipped bytes are named in one line.
A file without one (written before amflow recorded it) loads with one warning that it is unverified.
Every floating tensor read must be finite; a truncated or foreign file is one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from foundation.atomic import atomic_path

log = logging.getLogger(__name__)

FORMAT_KEY = "format"
CONFIG_KEY = "config"
CONTENT_HASH_KEY = "content_sha256"
WEIGHTS_SHA_KEY = "backbone_weights_sha256"
TRAINABLE_FORMAT = "amflow-trainable-1"
MERGED_FORMAT = "amflow-zeroi2v-merged-1"
EXPORT_FORMAT = "amflow-predictor-1"
EXPORT_RECORD_KEY = "amflow_predictor"
HEADS_RECORD_KEY = "amflow_heads"

# A video's decoded views (frames x clips x crops x 3 x crop x crop bytes) asked for by a file's record:
# above this it is a broken or hostile record, not a model (K400 ViT-L 16x3x3 at 224 px is 21 MiB).
MAX_VIDEO_BYTES = 2**30


class CheckpointError(ValueError):
    """A model file is missing, unreadable, damaged, or does not fit the model or its config."""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: each name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]
) -> None:
    """Writes a safetensors file atomically (temporary file, then rename) with its content hash."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**metadata, CONTENT_HASH_KEY: tensors_sha256(state)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file, with an error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{p}: not a readable safetensors file: {e}") from e


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the file's header (nothing loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def load_safetensors(path: str | Path, metadata: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an amflow file, verified: readable whole, content hash (when recorded), all finite."""
    meta = read_metadata(path) if metadata is None else metadata
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a truncated file: SafetensorError, or an OS error while mapping it
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or damaged): {e}") from e
    recorded = meta.get(CONTENT_HASH_KEY)
    if recorded is None:
        log.warning("%s: no content hash (written by an older amflow): its tensors are unverified", path)
    elif tensors_sha256(tensors) != recorded:
        raise CheckpointError(
            f"{path}: its tensors do not match the content hash recorded when it was written (damaged or "
            "edited since); write it again (amflow export / merge / convert) or copy it again"
        )
    check_finite(tensors, path)
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Every floating tensor must be finite; the error names the first one that is not."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s)")


def check_fits(
    module: nn.Module, tensors: Mapping[str, Any], source: str | Path, what: str = "the model"
) -> None:
    """The file's tensors must be exactly ``module``'s state (names and shapes), e.g. a model built on the
    meta device from the file's own record, before anything of the record's size is allocated."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    wrong = [
        f"{k} {given[k]} (expected {expected[k]})"
        for k in sorted(expected)
        if given.get(k, expected[k]) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shapes {wrong[:3]}" if wrong else "",
        ]
        found = ", ".join(p for p in parts if p)
        raise CheckpointError(f"{source}: its tensors do not fit {what} its record describes: {found}")


# ``timm.create_model`` arguments that open a file or reach the network (besides ``pretrained``).
TIMM_SOURCE_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def without_sources(
    model_cfg: Mapping[str, Any], source: str | Path, records_weights: bool = False
) -> dict[str, Any]:
    """A model config read from a self-contained file, with every place to fetch weights from removed.

    Such a file carries its weights: a ``backbone.weights`` path, ``pretrained: true`` or a timm argument
    that loads or downloads (``TIMM_SOURCE_KWARGS``) in its record is never acted on (no file opened,
    nothing downloaded); it is ignored with a warning (``records_weights``: the writer records where the
    weights came from, e.g. a merge, so only the timm arguments are worth a warning).
    """
    cfg = dict(model_cfg)
    backbone = dict(cfg.get("backbone") or {})
    named = {} if records_weights else {k: backbone[k] for k in ("weights", "pretrained") if backbone.get(k)}
    timm_kwargs = dict(backbone.get("timm_kwargs") or {})
    named.update({f"timm_kwargs.{k}": timm_kwargs.pop(k) for k in TIMM_SOURCE_KWARGS if k in timm_kwargs})
    if named:
        log.warning("%s: its record names %s; ignored (the file carries its own weights)", source, named)
    backbone.update(weights=None, pretrained=False, timm_kwargs=timm_kwargs)
    cfg["backbone"] = backbone
    return cfg


def check_video_size(frames: int, clips: int, crops: int, crop_size: int, source: str | Path) -> None:
    """The views a record asks to decode per video must be bounded (``MAX_VIDEO_BYTES``)."""
    sizes = {"num_frames": frames, "num_clips": clips, "num_crops": crops, "crop_size": crop_size}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise CheckpointError(f"{source}: expected positive integers, got {bad}")
    nbytes = frames * clips * crops * 3 * crop_size * crop_size
    if nbytes > MAX_VIDEO_BYTES:
        raise CheckpointError(
            f"{source}: asks for {frames} frames x {clips} clips x {crops} crops at {crop_size} px per video "
            f"({nbytes / 2**30:.1f} GiB of pixels, limit {MAX_VIDEO_BYTES / 2**30:.0f} GiB): not a usable "
            "model"
        )


def read_class_names(meta: Mapping[str, str], path: str | Path, num_classes: int) -> list[str] | None:
    """The ``class_names`` JSON list of a file's metadata (None when absent); it must name every class of
    the classifier, no more, no fewer."""
    if "class_names" not in meta:
        return None
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata 'class_names' is not valid JSON: {e}") from e
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: metadata 'class_names' must be a list of names")
    if len(names) != num_classes:
        raise CheckpointError(f"{path}: {len(names)} class names for a classifier of {num_classes} classes")
    return names

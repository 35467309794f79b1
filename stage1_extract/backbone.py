"""The frozen image backbone: any timm ViT by name, weights from a local file (never downloaded)."""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


def create_vit(
    name: str,
    img_size: int | None = None,
    weights: str | Path | None = None,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Creates timm's ViT ``name`` with no classifier (``num_classes=0``) and loads local ``weights``.

    Without ``weights`` the model is randomly initialised, with a warning: nothing is downloaded.
    Extra keyword arguments go to ``timm.create_model`` (e.g. ``depth=2`` for a tiny test model).
    """
    kwargs = dict(pretrained=False, num_classes=0, **timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"backbone {name!r}: timm could not create it: {e}") from e
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"backbone {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if weights:
        load_vit_weights(model, weights)
    else:
        warnings.warn(
            f"backbone {name!r} is randomly initialised (no weights file given): features are not "
            "pretrained. Pass a local .safetensors/.pth with --weights / backbone.weights.",
            UserWarning,
            stacklevel=2,
        )
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file safely, without running pickled code."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{p}: not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors take many forms; all mean the same to a user
        raise WeightsError(f"{p}: cannot be read as a weights-only torch checkpoint: {e}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: expected a state dict of tensors")
    return obj


def load_vit_weights(model: VisionTransformer, path: str | Path) -> None:
    """Loads a plain timm ViT checkpoint, keys unchanged; adapter keys the file lacks stay as they are.

    timm's ``checkpoint_filter_fn`` remaps original releases (DINOv2, OpenAI CLIP) and resamples
    position embeddings, as ``timm.create_model(pretrained=True)`` would.
    """
    state = read_state_dict(path)
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith("head.") or hasattr(model.head, "weight")}
    result = model.load_state_dict(state, strict=False)
    backbone_missing = [k for k in result.missing_keys if not is_added_key(k)]
    if backbone_missing or result.unexpected_keys:
        raise WeightsError(
            f"{path}: does not fit {type(model).__name__}: missing {backbone_missing[:5]}"
            f"{'...' if len(backbone_missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )
    log.info("loaded backbone weights from %s", path)


ADDED_KEY_MARKERS = ("adapter", "aligner", "time_embed")


def is_added_key(key: str) -> bool:
    """Keys of modules amflow adds to a timm ViT (absent from plain timm checkpoints)."""
    return any(m in key for m in ADDED_KEY_MARKERS)


def file_sha256(path: str | Path | None) -> str | None:
    """The SHA-256 of a file (provenance of weights and checkpoints), or None without a file."""
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def freeze(module: nn.Module) -> nn.Module:
    """Turns off gradients of every parameter of ``module`` (the frozen backbone)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def pixel_stats(
    vit: VisionTransformer, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's input normalisation (timm ``pretrained_cfg`` mean and std), each shaped (3, 1, 1)."""
    cfg = vit.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(3, 1, 1)
    return mean, std


def normalise_video(video: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., 3, H, W) -> float in [0, 1], minus mean, over std: the backbone's input."""
    return (video.float().div_(255.0) - mean) / std


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: expected cpu, cuda, cuda:N or auto, got {device!r}") from e
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"device {device!r}: no {dev.type} device is available here (use cpu or auto)")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {device!r}: this machine has {count} {dev.type} device(s), numbered from 0")
    return dev

"""The frozen image backbone: a timm model of a registered family (``stage1_extract.families``) by name,
weights from a local file or timm's pretrained tag.

Local files may be in any format ``weight_formats`` recognises (timm, DINOv2, OpenAI CLIP / open_clip,
transformers DINOv2 / CLIP); ``pretrained=True`` uses timm's own download of the named tag through the
Hugging Face hub (its local cache when ``HF_HUB_OFFLINE=1``). Nothing else is downloaded.
"""

from __future__ import annotations

import logging
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from stage1_extract.families import FAMILIES, family_of, is_backbone
from stage1_extract.families.weight_formats import (
    architecture_name,
    check_architecture,
    read_weights,
    to_timm,
)

log = logging.getLogger(__name__)


# Matches the warning of a backbone built without weights, for ``warnings.filterwarnings(message=...)``
# where random weights are expected (parameter counts, tests, benchmarks); no other warning is muted.
RANDOM_INIT_WARNING = r"backbone .* is randomly initialised"


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


def create_backbone(
    name: str,
    img_size: int | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """Creates timm's model ``name`` (of a registered family) without classifier and loads its weights.

    ``weights``: a local file or transformers folder in any recognised format. ``pretrained``: timm's
    pretrained weights of the tag in ``name`` (e.g. ``vit_base_patch14_dinov2.lvd142m``), downloaded
    through the Hugging Face hub or read from its cache. With neither, the model is randomly initialised,
    with a warning. Extra keyword arguments go to ``timm.create_model`` (e.g. ``depth=2``).
    """
    if weights and pretrained:
        raise ValueError(f"backbone {name!r}: give either weights ({weights}) or pretrained, not both")
    kwargs = dict(pretrained=pretrained, num_classes=0, **timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"backbone {name!r}: timm could not create it: {e}") from e
    except (OSError, ValueError) as e:  # the hub's errors (offline, not cached) derive from these
        if not pretrained:
            raise
        raise WeightsError(
            f"backbone {name!r}: timm's pretrained weights could not be loaded from the Hugging Face hub "
            f"or its cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline, "
            "download them once on a machine with internet, or pass a local file with --weights"
        ) from e
    if not is_backbone(model):
        names = ", ".join(f.model_class.__name__ for f in FAMILIES)
        raise ValueError(f"backbone {name!r} is a {type(model).__name__}: amflow runs on {names}")
    if weights:
        load_vit_weights(model, weights)
    elif not pretrained:
        warnings.warn(  # RANDOM_INIT_WARNING matches it
            f"backbone {name!r} is randomly initialised (no weights file given): features are not "
            "pretrained. Pass a local file with --weights / backbone.weights, or --pretrained / "
            "backbone.pretrained: true for timm's weights of the named tag.",
            UserWarning,
            stacklevel=2,
        )
    return model


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the header's JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    return head[8:9] == b"{" and 2 <= size <= path.stat().st_size - 8


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip with a ``code/`` folder), as OpenAI's CLIP releases are."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def _pickle_reason(error: Exception) -> str:
    """torch's refusal without its advice to retry with ``weights_only=False`` (that would run the file's
    code): only what it found, e.g. ``unsupported GLOBAL posix.system``."""
    text = str(error)
    found = re.search(r"unsupported (global|operand) \S+", text, re.IGNORECASE)
    if found:
        return (
            f"it holds Python objects, not only tensors ({found.group(0).strip()}); refused, never unpickled"
        )
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects, not only tensors; refused, never unpickled"
    return text.splitlines()[0] if text else type(error).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file safely, without running pickled code.

    Pickles are read with ``weights_only=True``; TorchScript archives (OpenAI's ``ViT-B-16.pt``) with
    ``torch.jit.load``, which runs TorchScript, not pickled Python.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors" or _is_safetensors(p):  # by its content, whatever its name
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{p}: not a readable safetensors file: {e}") from e
    if _is_torchscript(p):  # OpenAI's own CLIP files: TorchScript archives, not pickles
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.10+: jit.load is deprecated
                return dict(torch.jit.load(str(p), map_location="cpu").state_dict())
        except Exception as e:  # TorchScript raises many types; all mean the same to a user
            raise WeightsError(f"{p}: a TorchScript archive that cannot be read: {e}") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors take many forms; all mean the same to a user
        raise WeightsError(
            f"{p}: cannot be read as a weights-only torch checkpoint: {_pickle_reason(e)}"
        ) from e
    for key in ("state_dict", "model", "module", "model_state"):  # model_state: the Hiera release
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: expected a state dict of tensors")
    return obj


def load_vit_weights(model: nn.Module, path: str | Path) -> str:
    """Loads a weights file (or transformers folder) of any recognised format; returns the format's name.

    The format's filter (``weight_formats``) maps its keys to timm's, then the family's timm
    ``checkpoint_filter_fn`` resamples position tables, as ``timm.create_model(pretrained=True)`` would
    (for every family; the ViT releases' formats only fit ViTs). Adapter keys the
    file lacks stay as they are. What the keys cannot tell (QuickGELU, mean/std) is checked and warned.
    """
    try:
        file = read_weights(path, read_state_dict)
    except FileNotFoundError as e:
        raise WeightsError(str(e)) from e
    try:
        state, fmt = to_timm(file.state, model)
    except (ValueError, KeyError, RuntimeError) as e:
        raise WeightsError(f"{path}: cannot be mapped to the keys of {architecture_name(model)}: {e}") from e
    check_architecture(model, fmt, file)
    model_keys = set(model.state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("head.") or k in model_keys}  # classifiers
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ: another width, depth or patch size
        raise WeightsError(
            f"{path}: {fmt.description} weights that do not fit {architecture_name(model)}: {e}"
        ) from e
    backbone_missing = [k for k in result.missing_keys if not is_added_key(k)]
    if backbone_missing or result.unexpected_keys:
        raise WeightsError(
            f"{path}: {fmt.description} weights that do not fit {architecture_name(model)}: missing "
            f"{backbone_missing[:5]}"
            f"{'...' if len(backbone_missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )
    log.info("loaded backbone weights from %s (%s)", path, fmt.description)
    return fmt.name


ADDED_KEY_MARKERS = ("adapter", "aligner", "time_embed")


def is_added_key(key: str) -> bool:
    """Keys of modules amflow adds to a timm backbone (absent from plain timm checkpoints)."""
    return any(m in key for m in ADDED_KEY_MARKERS)


def freeze(module: nn.Module) -> nn.Module:
    """Turns off gradients of every parameter of ``module`` (the frozen backbone)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def pixel_stats(vit: nn.Module, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's input normalisation (timm ``pretrained_cfg`` mean and std), each shaped (3, 1, 1)."""
    mean, std = family_of(vit).pixel_stats(vit)
    return torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1)


def normalise_video(video: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., 3, H, W) -> float in [0, 1], minus mean, over std: the backbone's input."""
    return (video.float().div_(255.0) - mean) / std

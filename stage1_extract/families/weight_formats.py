"""Weight files in the formats users hold, recognised by their keys and mapped to timm's ViT keys.

One small filter per format, in the spirit of timm's ``checkpoint_filter_fn`` (which every result then
passes through, for position-embedding resampling and timm's own conversions):

| format        | recognised by                                   | filter                                   |
|---------------|-------------------------------------------------|------------------------------------------|
| ``timm``      | anything else (timm's own keys)                 | timm's ``checkpoint_filter_fn``          |
| ``dinov2``    | ``mask_token`` (facebookresearch release)       | timm's ``_convert_dinov2``               |
| ``clip``      | ``visual.class_embedding`` or a visual tower's  | timm's ``_convert_openai_clip``          |
|               | ``class_embedding`` + ``transformer.resblocks`` | (OpenAI CLIP and open_clip)              |
| ``hf_dinov2`` | ``embeddings.cls_token`` + ``encoder.layer.``   | ``_convert_hf_dinov2`` (transformers)    |
| ``hf_clip``   | ``[vision_model.]embeddings.class_embedding``   | ``_convert_hf_clip`` (CLIPVisionModel,   |
|               |                                                 | CLIPModel)                               |

What the keys cannot reveal (QuickGELU or GELU, input mean/std) is checked where it can be:
``check_architecture`` warns, naming the timm model that fits.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import QuickGELU
from timm.models import vision_transformer as timm_vit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from stage1_extract.families import family_of

StateDict = dict[str, torch.Tensor]

# Files a transformers ``save_pretrained`` folder holds its weights in, in the order they are tried.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class WeightsFile:
    """A weights file read into memory: its tensors and, for a transformers folder, its configs."""

    path: Path
    state: StateDict
    hf_config: dict[str, Any] = field(default_factory=dict)
    hf_preprocessor: dict[str, Any] = field(default_factory=dict)


def _unwrap(state: Mapping[str, Any]) -> StateDict:
    """The tensors of a checkpoint (``state_dict``/``model``/``module``/``model_state`` wrappers removed)."""
    for key in ("state_dict", "model", "module", "model_state"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    return dict(state)


def _convert_visual_tower(state: StateDict, model: VisionTransformer) -> StateDict:
    """A CLIP visual tower saved alone (OpenAI/open_clip ``model.visual.state_dict()``) -> timm keys."""
    return timm_vit._convert_openai_clip({f"visual.{k}": v for k, v in state.items()}, model)


def _convert_hf_dinov2(state: StateDict, model: VisionTransformer) -> StateDict:
    """transformers ``Dinov2Model`` (``embeddings.*``, ``encoder.layer.N.*``, ``layernorm``) -> timm keys."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    swaps = [
        ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
        ("embeddings.position_embeddings", "pos_embed"),
        ("embeddings.cls_token", "cls_token"),
        ("encoder.layer.", "blocks."),
        ("attention.output.dense.", "attn.proj."),
        ("layer_scale1.lambda1", "ls1.gamma"),
        ("layer_scale2.lambda1", "ls2.gamma"),
        ("mlp.weights_in.", "mlp.fc1."),  # SwiGLU (giant): packed input projection, as timm packs it
        ("mlp.weights_out.", "mlp.fc2."),
        ("layernorm.", "norm."),
    ]
    out: StateDict = {}
    for k, v in state.items():
        if k == "embeddings.mask_token" or k.startswith("classifier."):
            continue
        for old, new in swaps:
            k = k.replace(old, new)
        out[k] = v
    return _fuse_qkv(out, r"(blocks\.\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def _convert_hf_clip(state: StateDict, model: VisionTransformer) -> StateDict:
    """transformers CLIPVisionModel/CLIPModel (``vision_model.*``) -> timm keys; text tower dropped."""
    prefix = "vision_model."
    if "embeddings.class_embedding" in state:  # CLIPVisionModel as transformers 5 saves it: no prefix
        state = {prefix + k: v for k, v in state.items()}
    swaps = [
        ("embeddings.patch_embedding.", "patch_embed.proj."),
        ("pre_layrnorm.", "norm_pre."),  # sic: transformers' spelling
        ("post_layernorm.", "norm."),
        ("encoder.layers.", "blocks."),
        ("layer_norm1.", "norm1."),
        ("layer_norm2.", "norm2."),
        ("self_attn.out_proj.", "attn.proj."),
    ]
    out: StateDict = {}
    for k, v in state.items():
        if not k.startswith(prefix) or k.endswith("position_ids"):
            continue
        k = k[len(prefix) :]
        if k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
            continue
        if k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
            continue
        for old, new in swaps:
            k = k.replace(old, new)
        out[k] = v
    return _fuse_qkv(out, r"(blocks\.\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")


def _fuse_qkv(state: StateDict, pattern: str) -> StateDict:
    """Separate query/key/value projections (``pattern``: block, part, param) -> timm's ``attn.qkv``."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    out: StateDict = {}
    for k, v in state.items():
        m = re.fullmatch(pattern, k)
        if m is None:
            out[k] = v
        else:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)[0]] = v  # q/k/v (query -> q)
    for (block, param), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ValueError(f"{block}: attention {param} has only {sorted(qkv)} of query, key and value")
        out[f"{block}.attn.qkv.{param}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def _is_dinov2(state: StateDict) -> bool:
    return "mask_token" in state


def _is_clip(state: StateDict) -> bool:
    return any(k in state for k in ("visual.class_embedding", "module.visual.class_embedding"))


def _is_clip_visual_tower(state: StateDict) -> bool:
    return "class_embedding" in state and "transformer.resblocks.0.attn.in_proj_weight" in state


def _is_hf_dinov2(state: StateDict) -> bool:
    return any(k.removeprefix("dinov2.") == "embeddings.cls_token" for k in state)


def _is_hf_clip(state: StateDict) -> bool:
    return "vision_model.embeddings.class_embedding" in state or "embeddings.class_embedding" in state


@dataclass(frozen=True)
class WeightFormat:
    """A format: its name, how its keys are recognised, and its filter to timm's keys (None: timm's own)."""

    name: str
    description: str
    detect: Callable[[StateDict], bool]
    convert: Callable[[StateDict, VisionTransformer], StateDict] | None = None


# Tried in order; the last one takes every file the others do not recognise.
FORMATS = (
    WeightFormat("hf_clip", "transformers CLIPVisionModel / CLIPModel", _is_hf_clip, _convert_hf_clip),
    WeightFormat("hf_dinov2", "transformers Dinov2Model", _is_hf_dinov2, _convert_hf_dinov2),
    WeightFormat("clip", "OpenAI CLIP / open_clip (full model)", _is_clip),
    WeightFormat(
        "clip", "OpenAI CLIP / open_clip (visual tower)", _is_clip_visual_tower, _convert_visual_tower
    ),
    WeightFormat("dinov2", "original DINOv2 release", _is_dinov2),
    WeightFormat("timm", "timm", lambda state: True),
)


def detect_format(state: StateDict) -> WeightFormat:
    """The format of a state dict, recognised by its keys (``timm`` when no other format matches)."""
    return next(f for f in FORMATS if f.detect(state))


def to_timm(state: StateDict, model: nn.Module) -> tuple[StateDict, WeightFormat]:
    """``state`` in ``model``'s timm keys (through its family's ``checkpoint_filter``: position tables
    resampled to its size, a family's original release keys renamed: Microsoft's Swin, Meta's Hiera), and
    its format. The formats other than ``timm`` are ViT releases (a ViT's keys do not fit another family:
    the load then fails naming the model).
    """
    state = _unwrap(state)
    fmt = detect_format(state)
    if fmt.convert is not None:
        state = fmt.convert(state, model)
    return family_of(model).checkpoint_filter(state, model), fmt


def read_weights(path: str | Path, read_file: Callable[[Path], StateDict]) -> WeightsFile:
    """Reads a weights file, or a transformers ``save_pretrained`` folder (its weights and configs).

    ``read_file`` reads one ``.safetensors``/``.pth``/``.bin`` file safely.
    """
    p = Path(path)
    if not p.is_dir():
        return WeightsFile(p, _unwrap(read_file(p)), *_hf_json(p.parent) if _beside_hf_config(p) else ())
    for name in HF_WEIGHT_FILES:
        f = p / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(f.read_text()).get("weight_map", {}).values()))
            state: StateDict = {}
            for shard in shards:
                state.update(read_file(p / shard))
        else:
            state = _unwrap(read_file(f))
        return WeightsFile(p, state, *_hf_json(p))
    raise FileNotFoundError(f"{p}: a folder without weights (expected one of {', '.join(HF_WEIGHT_FILES)})")


def _beside_hf_config(file: Path) -> bool:
    return file.name in HF_WEIGHT_FILES and (file.parent / "config.json").is_file()


def _hf_json(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) of a transformers folder; empty where absent or unreadable."""
    out = []
    for name in ("config.json", "preprocessor_config.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            data = {}
        out.append(data if isinstance(data, dict) else {})
    return out[0], out[1]


def architecture_name(model: nn.Module) -> str:
    """timm's name of ``model``'s architecture (for messages)."""
    return str(model.pretrained_cfg.get("architecture") or "the backbone")


def quickgelu_name(architecture: str) -> str | None:
    """timm's QuickGELU variant of a CLIP ViT name (``vit_base_patch16_clip_224`` ->
    ``vit_base_patch16_clip_quickgelu_224``), or None when timm has none."""
    name = architecture.split(".")[0].replace("_clip_", "_clip_quickgelu_")
    return name if "quickgelu" in name and name in timm.list_models(name) else None


def check_architecture(model: nn.Module, fmt: WeightFormat, file: WeightsFile) -> list[str]:
    """Warns (and returns the messages) where ``model`` does not compute what the file's weights expect.

    QuickGELU vs GELU: OpenAI's CLIP weights (and transformers configs saying ``quick_gelu``) need
    QuickGELU; input mean/std and layer-norm epsilon from a transformers folder's configs.
    """
    messages = []
    arch = architecture_name(model)
    blocks = family_of(model).blocks(model)
    quick = isinstance(getattr(blocks[0].mlp, "act", None), QuickGELU) if len(blocks) else False
    fix = quickgelu_name(arch)
    fix_text = f"use {fix}" if fix else "set backbone.timm_kwargs.act_layer: quick_gelu"
    vision_cfg = file.hf_config.get("vision_config", file.hf_config)
    hidden_act = vision_cfg.get("hidden_act") if isinstance(vision_cfg, dict) else None
    if fmt.name == "hf_clip" and hidden_act:
        if (hidden_act == "quick_gelu") != quick:
            messages.append(
                f"{file.path}: its config.json says hidden_act={hidden_act!r}, but {arch} uses "
                f"{'QuickGELU' if quick else 'GELU'}: the features will differ from the model's own"
                + (f" ({fix_text})" if not quick else "")
            )
    elif fmt.name in ("clip", "hf_clip") and not quick:
        messages.append(
            f"{file.path}: CLIP weights in {'OpenAI' if fmt.name == 'clip' else 'transformers'}' layout "
            f"loaded into {arch}, which uses GELU; OpenAI's own CLIP weights were trained with QuickGELU "
            f"({fix_text}). Ignore this for weights trained with GELU (e.g. open_clip's LAION models)."
        )
    if isinstance(vision_cfg, dict) and "layer_norm_eps" in vision_cfg:
        eps, ours = float(vision_cfg["layer_norm_eps"]), getattr(model.norm, "eps", None)
        if ours is not None and abs(ours - eps) > 1e-12:
            messages.append(f"{file.path}: layer_norm_eps {eps} in config.json, {arch} uses {ours}")
    pre = file.hf_preprocessor
    for key, timm_key in (("image_mean", "mean"), ("image_std", "std")):
        if key in pre and timm_key in model.pretrained_cfg:
            theirs, ours = [float(x) for x in pre[key]], [float(x) for x in model.pretrained_cfg[timm_key]]
            if len(theirs) != len(ours) or max(abs(a - b) for a, b in zip(theirs, ours)) > 1e-4:
                messages.append(
                    f"{file.path}: preprocessor_config.json {key} {theirs}, {arch} normalises with "
                    f"{timm_key} {ours}: inputs are normalised differently from the model's own"
                )
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=3)
    return messages

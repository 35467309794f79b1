"""ZeroI2V's backbone side (paper 002): a frozen timm backbone (ViT, Swin) with STDHA and linear adapters,
its config (``ZeroI2VConfig``: stage 1 extracts its features, stage 2 trains and merges it), and the
merged file format stage 1 reads back as a backbone.

``build_zeroi2v_backbone`` makes the training backbone; stage 2 (``stage2_temporal.zeroi2v.model``) adds the
ZeroI2V classifier, trains, and merges the adapters into the frozen weights (eq. 11).

Merged file layout: the plain timm model's own keys (``num_classes=0``), plus the classifier's tensors under
``zeroi2v_head.`` (``time_embed``, ``fc.weight``, ``fc.bias``); the metadata holds the resolved config.
Drop the ``zeroi2v_head.`` keys (``split_merged_state``) and the rest loads strictly into
``timm.create_model(name, num_classes=0)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import yaml
from torch import nn

from foundation.config import build_config
from foundation.formats import MERGED_FORMAT, load_safetensors
from stage1_extract.families.backbone import create_backbone, freeze
from stage1_extract.methods.checkpoint import (
    CONFIG_KEY,
    FORMAT_KEY,
    check_backbone_weights,
    load_into,
    load_trainable_checkpoint,
    read_metadata,
)
from stage1_extract.methods.linear_adapters import (
    DEFAULT_PLACES,
    add_linear_adapters,
    check_places,
    merge_linear_adapters,
)
from stage1_extract.methods.model_config import BackboneConfig
from stage1_extract.methods.stdha import StageOffsets, use_stage_stdha

HEAD_PREFIX = "zeroi2v_head."


@dataclass
class LinearAdapterConfig:
    """Linear adapters: bottleneck = round(ratio · D), scale s, dropout (training only), places per block.

    Places: ``before_qkv``, ``after_proj``, ``before_fc1``, ``after_fc2`` (the paper's four), or
    ``before_q``/``before_k``/``before_v`` (separate Q, K, V input adapters, Table 11b's 6-adapter setting).
    """

    ratio: float = 0.25
    scale: float = 0.5
    dropout: float = 0.1
    places: list[str] = field(default_factory=lambda: list(DEFAULT_PLACES))

    def validate(self) -> None:
        if self.ratio <= 0:
            raise ValueError(f"key 'adapter.ratio': expected > 0, got {self.ratio}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"key 'adapter.dropout': expected a probability in [0, 1), got {self.dropout}")
        try:
            check_places(self.places)
        except ValueError as e:
            raise ValueError(f"key 'adapter.places': {e}") from e


def _default_backbone() -> BackboneConfig:
    # ViT-Tiny has 3 heads: one looks a frame back, one a frame ahead, one stays spatial.
    return BackboneConfig(head_offsets={-1: 1, 1: 1, 0: 1})


@dataclass
class ZeroI2VConfig:
    """A ZeroI2V model: backbone (its ``head_offsets`` set STDHA), frames, classes, adapters, seed."""

    kind: Literal["zeroi2v"] = "zeroi2v"
    backbone: BackboneConfig = field(default_factory=_default_backbone)
    num_frames: int = 8
    num_classes: int = 400
    adapter: LinearAdapterConfig = field(default_factory=LinearAdapterConfig)
    head_dropout: float = 0.0  # dropout before the classifier when training (the release's I3D head: 0.5)
    train_norm: bool = False  # train the final norm with the adapters (the release trains its ln_post)
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"key 'head_dropout': expected a value in [0, 1), got {self.head_dropout}")
        if self.num_frames < 1:
            raise ValueError(f"key 'num_frames': expected >= 1, got {self.num_frames}")
        if self.num_classes < 1:
            raise ValueError(f"key 'num_classes': expected >= 1, got {self.num_classes}")
        spec = self.backbone.head_offsets
        if spec is None:
            return
        if isinstance(spec, float):
            if not 0 < spec <= 1:
                raise ValueError(
                    f"key 'backbone.head_offsets': a fraction of each stage's heads in (0, 1], got {spec}"
                )
            return  # its offsets are checked once resolved, against each stage's head count
        stages = spec if spec and all(isinstance(s, (list, dict)) for s in spec) else [spec]
        for stage in stages:
            offsets = list(stage) if isinstance(stage, list) else [o for o, n in stage.items() if n]
            far = [o for o in offsets if abs(o) >= self.num_frames]
            if far:
                raise ValueError(
                    f"key 'backbone.head_offsets': offsets {far} reach outside every {self.num_frames}-frame "
                    "clip (such a head would never see another frame)"
                )
            if isinstance(stage, dict) and any(n < 0 for n in stage.values()):
                raise ValueError(f"key 'backbone.head_offsets': head counts must be >= 0, got {stage}")


ResolvedOffsets = list[int] | list[list[int]]


def apply_stdha(
    model: nn.Module, spec: StageOffsets | None, num_frames: int, name: str
) -> ResolvedOffsets | None:
    """STDHA on every block of ``model`` as ``spec`` (``backbone.head_offsets``) assigns the heads.

    Returns the explicit offsets a resolved config records: one per-head list for a one-stage backbone
    (ViT), one list per stage otherwise (Swin); None without STDHA. Errors name the backbone ``name``.
    """
    if spec is None:
        return None
    try:
        offsets = use_stage_stdha(model, spec, num_frames)
    except ValueError as e:
        raise ValueError(f"backbone {name!r}: key 'backbone.head_offsets': {e}") from e
    far = sorted({o for stage in offsets for o in stage if abs(o) >= num_frames})
    if far:
        raise ValueError(
            f"backbone {name!r}: key 'backbone.head_offsets' resolves to offsets {far}, outside every "
            f"{num_frames}-frame clip (such a head would never see another frame)"
        )
    return offsets[0] if len(offsets) == 1 else offsets


def build_zeroi2v_backbone(
    backbone: BackboneConfig, num_frames: int, adapter: LinearAdapterConfig
) -> tuple[nn.Module, ResolvedOffsets | None]:
    """Frozen backbone + STDHA (``backbone.head_offsets``) + linear adapters, from the current RNG state.

    Returns the backbone and its explicit STDHA offsets (``apply_stdha``; None without STDHA).
    """
    b = backbone
    model = freeze(create_backbone(b.name, b.img_size, b.weights, b.pretrained, **b.timm_kwargs))
    offsets = apply_stdha(model, b.head_offsets, num_frames, b.name)
    add_linear_adapters(model, adapter.ratio, adapter.scale, adapter.dropout, adapter.places)
    return model, offsets


def split_merged_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(plain timm model state, head state without the ``zeroi2v_head.`` prefix) of a merged file."""
    vit = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return vit, head


def plain_vit(backbone: BackboneConfig) -> nn.Module:
    """timm's plain model of ``backbone`` with no classifier, weights to be loaded by the caller."""
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, **backbone.timm_kwargs)
    if backbone.img_size is not None:
        kwargs["img_size"] = backbone.img_size
    return timm.create_model(backbone.name, **kwargs)


def is_zeroi2v_file(path: str | Path, metadata: dict[str, str] | None = None) -> bool:
    """True for a merged ZeroI2V file and for a trainable ZeroI2V checkpoint (finetuned or converted)."""
    meta = read_metadata(path) if metadata is None else metadata
    if meta.get(FORMAT_KEY) == MERGED_FORMAT:
        return True
    return CONFIG_KEY in meta and (yaml.safe_load(meta[CONFIG_KEY]) or {}).get("kind") == "zeroi2v"


def merged_backbone(path: str | Path) -> tuple[str, ResolvedOffsets | None, dict[str, torch.Tensor]]:
    """(backbone name, STDHA head offsets, plain timm model state) of a merged ZeroI2V file, or of a
    trainable ZeroI2V checkpoint whose adapters are merged here, in memory (its classifier is not read)."""
    meta = read_metadata(path)
    if meta.get(FORMAT_KEY) == MERGED_FORMAT:
        vit_state, _ = split_merged_state(load_safetensors(path, meta))
        return meta.get("backbone", ""), json.loads(meta.get("head_offsets", "null")), vit_state
    state, stored = load_trainable_checkpoint(path)
    source = f"{path} (metadata '{CONFIG_KEY}')"
    backbone = build_config(BackboneConfig, stored.get("backbone") or {}, source)
    adapter = build_config(LinearAdapterConfig, stored.get("adapter") or {}, source)
    check_backbone_weights(path, stored)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(stored.get("seed", 0)))
        vit, offsets = build_zeroi2v_backbone(backbone, int(stored.get("num_frames", 8)), adapter)
    holder = nn.ModuleDict({"vit": vit})
    load_into(holder, {k: v for k, v in state.items() if k.startswith("vit.")}, path)
    merge_linear_adapters(vit)
    return backbone.name, offsets, vit.state_dict()

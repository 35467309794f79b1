"""ZeroI2V's backbone side (paper 002): a frozen timm ViT with STDHA and linear adapters, and the merged
file format stage 1 reads back as a backbone.

``build_zeroi2v_backbone`` makes the training backbone; stage 2 (``stage2_temporal.zeroi2v``) adds the
ZeroI2V classifier, trains, and merges the adapters into the frozen weights (eq. 11).

Merged file layout: the plain timm ViT's own keys (``num_classes=0``), plus the classifier's tensors under
``zeroi2v_head.`` (``time_embed``, ``fc.weight``, ``fc.bias``); the metadata holds the resolved config.
Drop the ``zeroi2v_head.`` keys (``split_merged_state``) and the rest loads strictly into
``timm.create_model(name, num_classes=0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from stage1_extract.backbone import create_vit, freeze
from stage1_extract.linear_adapters import DEFAULT_PLACES, add_linear_adapters, parse_place
from stage1_extract.model_config import BackboneConfig
from stage1_extract.stdha import expand_head_offsets, use_stdha

HEAD_PREFIX = "zeroi2v_head."
MERGED_FORMAT = "amflow-zeroi2v-merged-1"


@dataclass
class LinearAdapterConfig:
    """Linear adapters: bottleneck = round(ratio · D), scale s, dropout (training only), places per block."""

    ratio: float = 0.25
    scale: float = 0.5
    dropout: float = 0.1
    places: list[str] = field(default_factory=lambda: list(DEFAULT_PLACES))

    def validate(self) -> None:
        if self.ratio <= 0:
            raise ValueError(f"key 'adapter.ratio': expected > 0, got {self.ratio}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"key 'adapter.dropout': expected a probability in [0, 1), got {self.dropout}")
        if len(set(self.places)) != len(self.places):
            raise ValueError(f"key 'adapter.places': places repeat: {self.places}")
        for place in self.places:
            try:
                parse_place(place)
            except ValueError as e:
                raise ValueError(f"key 'adapter.places': {e}") from e


def build_zeroi2v_backbone(
    backbone: BackboneConfig, num_frames: int, adapter: LinearAdapterConfig
) -> tuple[VisionTransformer, list[int] | None]:
    """Frozen ViT + STDHA (``backbone.head_offsets``) + linear adapters, from the current RNG state.

    Returns the ViT and the explicit per-head offset list (None without STDHA).
    """
    vit = freeze(create_vit(backbone.name, backbone.img_size, backbone.weights, **backbone.timm_kwargs))
    offsets = None
    if backbone.head_offsets is not None:
        try:
            offsets = expand_head_offsets(backbone.head_offsets, vit.blocks[0].attn.num_heads)
        except ValueError as e:
            raise ValueError(f"backbone {backbone.name!r}: {e}") from e
        use_stdha(vit, offsets, num_frames)
    add_linear_adapters(vit, adapter.ratio, adapter.scale, adapter.dropout, adapter.places)
    return vit, offsets


def split_merged_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(plain timm ViT state, head state without the ``zeroi2v_head.`` prefix) of a merged file's tensors."""
    vit = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return vit, head


def plain_vit(backbone: BackboneConfig) -> VisionTransformer:
    """timm's plain ViT class of ``backbone`` with no classifier, weights to be loaded by the caller."""
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, **backbone.timm_kwargs)
    if backbone.img_size is not None:
        kwargs["img_size"] = backbone.img_size
    return timm.create_model(backbone.name, **kwargs)

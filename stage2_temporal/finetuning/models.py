"""End-to-end models: stage 1's feature model with stage 2's classifier, for finetuning and reports.

``kind: amflow`` is the AM-flow feature model plus the averaging classifier; ``kind: zeroi2v`` the
STDHA + linear-adapter backbone plus the ZeroI2V classifier. ``build_model`` assembles either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from foundation.config import ConfigError, build_config, merge_into, parse_overrides, read_yaml
from stage1_extract.families import family_of
from stage1_extract.features import feature_type
from stage1_extract.methods.amflow_model import AMFlowConfig, AMFlowExtractor, assemble_amflow
from stage2_temporal.heads import AveragingClassifier, HeadsConfig, LSTMHeadsConfig, build_classifier
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v


@dataclass
class AMFlowModelConfig(AMFlowConfig):
    """An AM-flow model end to end: the feature settings plus the classifier (classes and heads)."""

    num_classes: int = 31
    heads: HeadsConfig = field(default_factory=LSTMHeadsConfig)
    # Temporal heads on the adapters' pooled embeddings; false leaves the AM-flow map heads (and the last
    # frame, if on), as stage 2 does with ``adapters: []``.
    embedding_heads: bool = True

    def validate(self) -> None:
        super().validate()
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


class AMFlowModel(AMFlowExtractor):
    """Frozen timm ViT + AM-flow adapters (``extract``) + averaging classifier (``classifier``).

    Args:
        vit: the ViT with its AM-flow blocks in place.
        cfg: the resolved end-to-end config.
        classifier: the averaging classifier over the features ``extract`` gives.
    """

    def __init__(self, vit: VisionTransformer, cfg: AMFlowModelConfig, classifier: AveragingClassifier):
        super().__init__(vit, cfg)
        self.classifier = classifier

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> clip logits (B, C)."""
        return self.classifier(self.extract(video))

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for the parameter report (``amflow model-info``)."""
        groups = super().components()
        groups.update(temporal_heads=[], last_frame_head=[])
        for name, p in self.classifier.named_parameters():
            key = "last_frame_head" if name.startswith("last_frame_head.") else "temporal_heads"
            groups[key].append(p)
        return groups


def build_amflow(cfg: AMFlowModelConfig, weights: str | None = None) -> AMFlowModel:
    """The AM-flow model end to end; adapters and heads initialised from ``cfg.seed`` (global RNG untouched).

    The feature model is built exactly as stage 1 builds it, so its adapters match a store's.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        features = assemble_amflow(cfg, weights)
        classifier = build_classifier(
            cfg.heads,
            num_classes=cfg.num_classes,
            num_adapters=len(features.adapter_names) if cfg.embedding_heads else 0,
            embed_dim=features.bottleneck,
            cls_dim=features.embed_dim,
            flow_blocks=feature_type(cfg).layout_of(features).flow_geometry,
            seed=cfg.seed,
        )
    return AMFlowModel(features.vit, cfg, classifier)


ModelConfig = AMFlowModelConfig | ZeroI2VConfig
# kind -> its config; the one list of end-to-end model kinds.
MODEL_KINDS: dict[str, type] = {"amflow": AMFlowModelConfig, "zeroi2v": ZeroI2VConfig}


def model_config_from_dict(data: dict[str, Any], source: str = "<config>") -> ModelConfig:
    """Builds the config class named by ``kind`` (default ``amflow``) from a mapping."""
    kind = data.get("kind", "amflow")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"{source}: key 'kind': expected one of {sorted(MODEL_KINDS)}, got {kind!r}")
    return build_config(MODEL_KINDS[kind], data, source)


def model_config_class(path: str | Path) -> type:
    """The config class a model YAML's ``kind`` names (for routing overrides before loading it)."""
    kind = read_yaml(path).get("kind", "amflow")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"{path}: key 'kind': expected one of {sorted(MODEL_KINDS)}, got {kind!r}")
    return MODEL_KINDS[kind]


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """Reads a model YAML (any kind) and applies ``key.sub=value`` overrides."""
    data = read_yaml(path)
    kind = {**data, **parse_overrides(overrides)}.get("kind", "amflow")
    data = merge_into(MODEL_KINDS.get(kind, AMFlowModelConfig), data, parse_overrides(overrides))
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return model_config_from_dict(data, source)


def build_model(cfg: ModelConfig) -> AMFlowModel | ZeroI2VModel:
    """Builds the model a config describes."""
    if isinstance(cfg, ZeroI2VConfig):
        return build_zeroi2v(cfg)
    return build_amflow(cfg)


def count_parameters(params: Iterable[nn.Parameter]) -> tuple[int, int]:
    """(total, trainable) element counts, each parameter tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in params}
    total = sum(p.numel() for p in seen.values())
    return total, sum(p.numel() for p in seen.values() if p.requires_grad)


def parameter_report(model: AMFlowModel | ZeroI2VModel) -> dict[str, Any]:
    """``{"components": {name: {"total", "trainable"}}, "total", "trainable", "family", "blocks"}``:
    parameters per ``model.components()``, the backbone family and per block its geometry (token grid,
    tokens, heads, width, prefix tokens, attention window, whether it pools)."""
    components = {}
    for name, params in model.components().items():
        total, trainable = count_parameters(params)
        components[name] = {"total": total, "trainable": trainable}
    total, trainable = count_parameters(model.parameters())
    family = family_of(model.vit)
    blocks = [
        {
            "block": i + 1,
            "grid": list(g.grid),
            "tokens": g.tokens,
            "heads": g.heads,
            "width": g.width,
            "prefix_tokens": g.prefix_tokens,
            "window": list(g.window) if g.window else None,
            "pools": g.pools,
        }
        for i, g in enumerate(family.block_geometry(model.vit))
    ]
    return {
        "components": components,
        "total": total,
        "trainable": trainable,
        "family": family.__name__,
        "blocks": blocks,
    }


def build_model_on_meta(cfg: ModelConfig) -> AMFlowModel | ZeroI2VModel:
    """Builds the model without allocating its weights (for counting parameters of paper-size configs)."""
    with torch.device("meta"):
        return build_model(cfg)

"""ZeroI2V (paper 002) as a feature type: the per-frame pooled final features of its STDHA backbone (linear
adapters unmerged, or merged from a checkpoint), cached as one adapter sequence ``pooled`` (T, D) and the
last frame's feature as ``cls``, so stage 2's heads train on what ZeroI2V's own classifier averages."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from foundation.config import ConfigError
from foundation.features import ClipFeatures
from foundation.formats import MERGED_FORMAT, load_safetensors
from stage1_extract.families import family_of
from stage1_extract.features.base import FeatureExtractor, FeatureLayout
from stage1_extract.methods.checkpoint import FORMAT_KEY, load_trainable_checkpoint, read_metadata
from stage1_extract.methods.zeroi2v import (
    ZeroI2VConfig,
    apply_stdha,
    build_zeroi2v_backbone,
    is_zeroi2v_file,
    merged_backbone,
    plain_vit,
    split_merged_state,
)


def _time_embed(checkpoint: str) -> torch.Tensor:
    """The trained temporal position embedding (1, T, D) of a merged file or a ZeroI2V checkpoint."""
    meta = read_metadata(checkpoint)
    if meta.get(FORMAT_KEY) == MERGED_FORMAT:
        return split_merged_state(load_safetensors(checkpoint, meta))[1]["time_embed"]
    state = load_trainable_checkpoint(checkpoint)[0]
    if "head.time_embed" not in state:
        raise ConfigError(f"{checkpoint}: a ZeroI2V checkpoint without 'head.time_embed'")
    return state["head.time_embed"]


class ZeroI2VFeatures(FeatureExtractor):
    """``vit`` (STDHA, with or without linear adapters) and the temporal position embedding added to
    every frame's tokens before the blocks (zero until a checkpoint supplies the trained one)."""

    name = "zeroi2v"
    config_class = ZeroI2VConfig

    def __init__(self, vit: nn.Module, cfg: ZeroI2VConfig) -> None:
        super().__init__()
        self.vit, self.cfg = vit, cfg
        dim = family_of(vit).embed_dim(vit)
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, dim), requires_grad=False)

    @classmethod
    def build(cls, cfg: ZeroI2VConfig, checkpoint: str | None = None) -> ZeroI2VFeatures:
        """Random adapters from ``cfg.seed`` without ``checkpoint``; with a merged ZeroI2V file or a ZeroI2V
        checkpoint (its adapters merged here), its backbone, STDHA offsets and temporal embedding."""
        if checkpoint is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                vit, offsets = build_zeroi2v_backbone(cfg.backbone, cfg.num_frames, cfg.adapter)
            resolved = dataclasses.replace(cfg.backbone, head_offsets=offsets)
            return cls(vit, dataclasses.replace(cfg, backbone=resolved)).eval()
        if not is_zeroi2v_file(checkpoint):
            raise ConfigError(f"{checkpoint}: not a merged ZeroI2V file or ZeroI2V checkpoint")
        name, offsets, state = merged_backbone(checkpoint)
        if name != cfg.backbone.name:
            raise ConfigError(
                f"{checkpoint}: a ZeroI2V {name!r} model; the config's backbone is {cfg.backbone.name!r}"
            )
        resolved = dataclasses.replace(cfg.backbone, head_offsets=offsets, weights=None, pretrained=False)
        vit = plain_vit(resolved)
        try:
            vit.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"{checkpoint}: does not load into timm {name!r}: {e}") from e
        apply_stdha(vit, offsets, cfg.num_frames, name)
        model = cls(
            vit, dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, head_offsets=offsets))
        )
        embed = _time_embed(checkpoint)
        if embed.shape != model.time_embed.shape:
            raise ConfigError(
                f"{checkpoint}: temporal embedding {tuple(embed.shape)}; the config's num_frames="
                f"{cfg.num_frames} needs {tuple(model.time_embed.shape)}"
            )
        model.time_embed.data.copy_(embed)
        return model.eval()

    @property
    def config(self) -> ZeroI2VConfig:
        return self.cfg

    @property
    def backbone(self) -> nn.Module:
        return self.vit

    def add_time_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Adds frame t's embedding to every token of tokens (B·T, N, D) or (B·T, H, W, D)."""
        T = self.cfg.num_frames
        embed = self.time_embed.view(1, T, *[1] * (tokens.dim() - 2), -1)
        return (tokens.unflatten(0, (-1, T)) + embed).reshape(tokens.shape)

    @torch.no_grad()
    def extract(self, video: torch.Tensor) -> ClipFeatures:
        if video.dim() != 5 or video.shape[1] != self.cfg.num_frames:
            raise ValueError(
                f"ZeroI2V features: expected video (B, {self.cfg.num_frames}, 3, H, W), "
                f"got {tuple(video.shape)}"
            )
        B, T = video.shape[:2]
        vit, family = self.vit, family_of(self.vit)
        x = family.embed(vit, video.flatten(0, 1), extra=self.add_time_embed)
        x = family.pooled(vit, family.final_norm(vit, family.forward_blocks(vit, x))).unflatten(0, (B, T))
        return ClipFeatures(embeddings=x.unsqueeze(1), cls=x[:, -1])

    def layout(self) -> FeatureLayout:
        dim = self.vit.num_features
        return FeatureLayout(
            adapter_names=["pooled"], embed_dim=dim, cls_dim=dim, flow_block_names=[], flow_geometry=[]
        )

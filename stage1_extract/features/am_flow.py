"""AM flow (paper 000) as a feature type: pooled adapter embeddings, the last frame's pooled feature, and
per flow block its AM-flow map (h values per token)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from foundation.config import ConfigError
from stage1_extract.families import family_of
from stage1_extract.families.backbone import is_added_key
from stage1_extract.families.base import BlockGeometry
from stage1_extract.features.base import FeatureExtractor, FeatureLayout
from stage1_extract.methods.amflow_model import AMFlowConfig, AMFlowExtractor, assemble_amflow
from stage1_extract.methods.checkpoint import load_trainable_checkpoint
from stage1_extract.methods.zeroi2v import is_zeroi2v_file, merged_backbone
from store.layout import FlowBlock


class AMFlowFeatures(AMFlowExtractor, FeatureExtractor):
    """The AM-flow feature model (``AMFlowExtractor``, same state-dict keys) as a feature type."""

    name = "am_flow"
    config_class = AMFlowConfig

    @classmethod
    def map_channels(cls, block: BlockGeometry) -> int:
        """Values per token of a block's cached map: its heads (AM flow, eq. 4)."""
        return block.heads

    @classmethod
    def build(cls, cfg: AMFlowConfig, checkpoint: str | None = None) -> AMFlowFeatures:
        """The model in inference mode, with trained adapters or a merged ZeroI2V backbone if given.

        A merged ZeroI2V file (``amflow merge``), or a ZeroI2V checkpoint (merged here), supplies the
        backbone weights and its STDHA head offsets; an AM-flow finetuning checkpoint supplies adapters and
        aligning encoders. Without one the adapters are initialised from ``cfg.seed`` (in the store).
        """
        if checkpoint and is_zeroi2v_file(checkpoint):
            name, offsets, vit_state = merged_backbone(checkpoint)
            if name != cfg.backbone.name:
                raise ConfigError(
                    f"{checkpoint}: a ZeroI2V {name!r} model; the config's backbone is {cfg.backbone.name!r}"
                )
            cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, head_offsets=offsets))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = cls(assemble_amflow(cfg).vit, cfg)
        if checkpoint:
            model.load_checkpoint(checkpoint)
        return model.eval()

    def load_checkpoint(self, checkpoint: str) -> None:
        """Loads the backbone of a merged ZeroI2V file, or the adapters of an AM-flow finetuning run."""
        names = self.state_dict()
        if is_zeroi2v_file(checkpoint):
            source = "a merged ZeroI2V backbone"
            state = {f"vit.{k}": v for k, v in merged_backbone(checkpoint)[2].items()}
            wanted = {k for k in names if k.startswith("vit.") and not is_added_key(k)}
        else:
            # Only the adapters and aligning encoders shape the features; the heads (sized for the dataset
            # they were trained on) are not needed to extract.
            source = "trained adapters"
            state = {
                k: v for k, v in load_trainable_checkpoint(checkpoint)[0].items() if k.startswith("vit.")
            }
            wanted = {k for k in names if k.startswith("vit.") and is_added_key(k)}
        missing, unknown = sorted(wanted - set(state)), sorted(set(state) - set(names))
        if missing or unknown:
            raise ConfigError(
                f"{checkpoint}: {source} that do not fit this model config: missing {missing[:4]}, "
                f"unexpected {unknown[:4]}"
            )
        self.load_state_dict(state, strict=False)

    @property
    def config(self) -> AMFlowConfig:
        return self.cfg

    @property
    def backbone(self) -> nn.Module:
        return self.vit

    def layout(self) -> FeatureLayout:
        return self.layout_of(self)

    @classmethod
    def layout_of(cls, model: AMFlowExtractor) -> FeatureLayout:
        """The feature shapes of an AM-flow model (also of stage 2's end-to-end one, which extends it)."""
        geometry = family_of(model.vit).block_geometry(model.vit)
        flow = []
        for i in model.flow_block_indices:
            g = geometry[i]
            flow.append(FlowBlock(cls.map_channels(g), g.tokens, g.grid, g.prefix_tokens, g.heads, g.width))
        return FeatureLayout(
            adapter_names=list(model.adapter_names),
            embed_dim=model.bottleneck,
            cls_dim=model.embed_dim,
            flow_block_names=list(model.flow_block_names),
            flow_geometry=flow,
        )

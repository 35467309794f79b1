"""ZeroI2V (paper 002) end to end: the STDHA + linear-adapter backbone of stage 1 and the ZeroI2V
classifier, and the zero-cost merge.

Training model: frozen backbone (a timm ViT or Swin, through ``stage1_extract.families``), STDHA
attention, four linear adapters per block, and a classifier made of a learned temporal position embedding
(1×T×D, added to every token after the ViT's position embedding, after Swin's patch embedding), the mean
over frames of the backbone's pooled feature (the final normed CLS for CLIP/DINOv2 ViTs, the mean of the
final normed tokens for Swin) and a linear layer. After training, ``merge_checkpoint`` folds the adapters
into the frozen linear layers (eq. 11) and writes a plain timm state dict (layout:
``stage1_extract.methods.zeroi2v``); ``load_merged`` turns it back into a runnable model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from foundation.config import build_config, config_to_dict, load_config
from foundation.files import file_sha256
from foundation.formats import load_safetensors, without_sources
from stage1_extract.families import family_of
from stage1_extract.methods.checkpoint import (
    CONFIG_KEY,
    FORMAT_KEY,
    CheckpointError,
    check_backbone_weights,
    load_into,
    load_trainable_checkpoint,
    read_config,
    read_metadata,
    write_safetensors,
)
from stage1_extract.methods.linear_adapters import linear_adapter_modules, merge_linear_adapters
from stage1_extract.methods.stdha import stdha_modules
from stage1_extract.methods.zeroi2v import (
    HEAD_PREFIX,
    MERGED_FORMAT,
    ResolvedOffsets,
    ZeroI2VConfig,
    apply_stdha,
    build_zeroi2v_backbone,
    plain_vit,
    split_merged_state,
)


class ZeroI2VHead(nn.Module):
    """Temporal position embedding (added before the blocks), mean over frames, linear classifier.

    ``dim``: the width of the tokens before the first block; ``feature_dim``: of the pooled feature
    (the same for a ViT; Swin's final stage is 8x its first); ``dropout`` before the classifier.
    """

    def __init__(
        self,
        num_frames: int,
        dim: int,
        num_classes: int,
        feature_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_frames = num_frames
        self.drop = nn.Dropout(dropout)  # no parameters: checkpoints and merged files are unchanged
        # Zero-initialised: at initialisation the backbone sees exactly what the image model sees.
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, dim))
        self.fc = nn.Linear(feature_dim or dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        """Trained without weight decay (timm's convention): the temporal position embedding."""
        return {"time_embed"}

    def add_time_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Adds frame t's embedding to every token (CLS included) of tokens (B·T, N, D) or (B·T, H, W, D)."""
        clips = tokens.unflatten(0, (-1, self.num_frames))
        embed = self.time_embed.view(1, self.num_frames, *[1] * (tokens.dim() - 2), -1)
        return (clips + embed).reshape(tokens.shape)  # batch kept symbolic in ONNX

    def forward(self, frame_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from per-frame pooled features (B, T, D)."""
        return self.fc(self.drop(frame_features.mean(dim=1)))


class ZeroI2VModel(nn.Module):
    """Video classifier: ``vit``, the backbone of any family (STDHA, with or without linear adapters), and
    a ZeroI2V ``head``."""

    def __init__(self, vit: nn.Module, head: ZeroI2VHead):
        super().__init__()
        for attn in stdha_modules(vit):
            if attn.num_frames != head.num_frames:
                raise ValueError(
                    f"ZeroI2VModel: STDHA expects {attn.num_frames} frames, the head {head.num_frames}"
                )
        self.vit = vit
        self.head = head
        self.config: ZeroI2VConfig | None = None  # the resolved config, set by build_zeroi2v

    @property
    def num_frames(self) -> int:
        return self.head.num_frames

    def frame_features(self, video: torch.Tensor) -> torch.Tensor:
        """Per-frame pooled features (B, T, D) of ``video`` (B, T, 3, H, W), already normalised."""
        if video.dim() != 5 or video.shape[1] != self.num_frames:
            raise ValueError(
                f"ZeroI2VModel: expected video (B, {self.num_frames}, 3, H, W), got {tuple(video.shape)}"
            )
        B, T = video.shape[:2]
        vit, family = self.vit, family_of(self.vit)
        x = family.embed(vit, video.flatten(0, 1), extra=self.head.add_time_embed)
        x = family.pooled(vit, family.final_norm(vit, family.forward_blocks(vit, x)))
        return x.unflatten(0, (B, T))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of ``video`` (B, T, 3, H, W), already normalised."""
        return self.head(self.frame_features(video))

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per component, for the parameter report: backbone, linear adapters, classifier."""
        adapters = [p for m in linear_adapter_modules(self.vit) for p in m.adapter.parameters()]
        ids = {id(p) for p in adapters}
        return {
            "backbone": [p for p in self.vit.parameters() if id(p) not in ids],
            "linear_adapters": adapters,
            "classifier": list(self.head.parameters()),
        }


def build_zeroi2v(cfg: ZeroI2VConfig) -> ZeroI2VModel:
    """Frozen backbone + STDHA + linear adapters + head, seeded by ``cfg.seed`` (works on the meta device).

    ``model.config`` is the resolved config: ``backbone.head_offsets`` as the explicit per-head list.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vit, offsets = build_zeroi2v_backbone(cfg.backbone, cfg.num_frames, cfg.adapter)
        head = zeroi2v_head(vit, cfg)
    if cfg.train_norm:
        vit.norm.requires_grad_(True)  # the final norm (ln_post), saved with the adapters
    model = ZeroI2VModel(vit, head)
    model.config = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, head_offsets=offsets))
    return model


def zeroi2v_head(vit: nn.Module, cfg: ZeroI2VConfig) -> ZeroI2VHead:
    """The head of ``cfg`` for backbone ``vit``: its embedding width and pooled feature width."""
    return ZeroI2VHead(
        cfg.num_frames, family_of(vit).embed_dim(vit), cfg.num_classes, vit.num_features, cfg.head_dropout
    )


@dataclass
class MergeSummary:
    """What ``merge_checkpoint`` wrote."""

    out_path: Path
    adapters_merged: int
    vit_parameters: int
    head_parameters: int
    num_frames: int
    head_offsets: ResolvedOffsets | None


def merge_checkpoint(
    checkpoint_path: str | Path,
    out_path: str | Path,
    config: ZeroI2VConfig | str | Path | None = None,
    overwrite: bool = False,
) -> MergeSummary:
    """Folds a trained ZeroI2V checkpoint's adapters into its backbone and writes the merged file.

    ``config`` (a config or YAML path) replaces the config stored in the checkpoint, e.g. when the
    backbone weights file has moved.
    """
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    state, stored = load_trainable_checkpoint(checkpoint_path)
    if config is None:
        if stored.get("kind", "zeroi2v") != "zeroi2v":
            raise CheckpointError(
                f"{checkpoint_path}: holds a {stored.get('kind')!r} model; only ZeroI2V adapters merge"
            )
        cfg = build_config(ZeroI2VConfig, stored, source=f"{checkpoint_path} (metadata '{CONFIG_KEY}')")
    elif isinstance(config, ZeroI2VConfig):
        cfg = config
    else:
        cfg = load_config(ZeroI2VConfig, config)
    check_backbone_weights(checkpoint_path, config_to_dict(cfg))
    model = build_zeroi2v(cfg)
    load_into(model, state, checkpoint_path)
    adapters = sum(m.num_adapters for m in linear_adapter_modules(model.vit))
    merge_linear_adapters(model.vit)
    meta = {
        "merged_from": str(checkpoint_path),
        "merged_from_sha256": file_sha256(checkpoint_path) or "",
    }
    if "class_names" in read_metadata(checkpoint_path):  # a finetuning checkpoint names its classes
        meta["class_names"] = read_metadata(checkpoint_path)["class_names"]
    save_merged(model, out, meta)
    return MergeSummary(
        out_path=out,
        adapters_merged=adapters,
        vit_parameters=sum(p.numel() for p in model.vit.parameters()),
        head_parameters=sum(p.numel() for p in model.head.parameters()),
        num_frames=model.num_frames,
        head_offsets=model.config.backbone.head_offsets,
    )


def save_merged(model: ZeroI2VModel, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Writes a merged ZeroI2V model: plain timm keys + ``zeroi2v_head.*``, resolved config in metadata."""
    if linear_adapter_modules(model.vit):
        raise ValueError(
            "save_merged: the model still has linear adapters (call merge_linear_adapters first)"
        )
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("save_merged: the model has no resolved config (build it with build_zeroi2v)")
    tensors = dict(model.vit.state_dict())
    tensors.update({HEAD_PREFIX + k: v for k, v in model.head.state_dict().items()})
    meta = {
        FORMAT_KEY: MERGED_FORMAT,
        CONFIG_KEY: yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
        "backbone": cfg.backbone.name,
        "num_frames": str(model.num_frames),
        "head_offsets": json.dumps(cfg.backbone.head_offsets),
        **(metadata or {}),
    }
    write_safetensors(tensors, path, meta)


def load_merged(path: str | Path) -> tuple[nn.Module, ZeroI2VHead]:
    """The merged model of ``path``: a plain timm backbone (STDHA attention, no adapters) and the ZeroI2V
    head.

    ``ZeroI2VModel(vit, head)`` runs it on videos; both are returned in eval mode.
    """
    meta = read_metadata(path)
    if meta.get(FORMAT_KEY) != MERGED_FORMAT:
        raise CheckpointError(f"{path}: not a merged ZeroI2V file (metadata format {meta.get(FORMAT_KEY)!r})")
    stored = without_sources(read_config(path, meta), path, records_weights=True)  # no file or download
    cfg = build_config(ZeroI2VConfig, stored, source=f"{path} (metadata '{CONFIG_KEY}')")
    vit_state, head_state = split_merged_state(load_safetensors(path, meta))
    vit = plain_vit(cfg.backbone)
    try:
        vit.load_state_dict(vit_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not load into timm {cfg.backbone.name!r}: {e}") from e
    apply_stdha(vit, cfg.backbone.head_offsets, cfg.num_frames, cfg.backbone.name)
    head = zeroi2v_head(vit, cfg)
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the '{HEAD_PREFIX}' tensors do not fit the ZeroI2V head: {e}") from e
    return vit.eval(), head.eval()

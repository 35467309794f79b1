"""Official ZeroI2V checkpoints (MCG-NJU/ZeroI2V, mmaction2) converted to amflow ZeroI2V checkpoints.

The release's ``ViT_Zero_CLIP`` (``mmaction/models/backbones/vit_zero_clip.py``) is OpenAI's CLIP ViT with,
per block (``backbone.transformer.resblocks.N``), the linear adapters

| release                         | where                                   | amflow place             |
|---------------------------------|-----------------------------------------|--------------------------|
| ``T_Adapter_in``                | on ``ln_1``'s output, into ``in_proj``  | ``before_qkv``           |
| ``T_Adapter_in_{q,k,v}``        | one each for Q, K, V (``_ablation``,    | ``before_q/k/v``         |
|                                 | ``attn_adapter_type='qkv'``)            |                          |
| ``S_Adapter``                   | on ``attn.out_proj``'s output           | ``after_proj``           |
| ``MLP_Adapter``                 | on ``ln_2``'s output, into ``c_fc``     | ``before_fc1``           |
| ``MLP_Adapter_out``             | on ``c_proj``'s output (num_tadapter=2) | ``after_fc2``            |

each ``x + scale · D_fc2(dropout(D_fc1(x)))`` (``scale`` = the config's ``adapter_scale``, not stored in
the checkpoint); ``temporal_embedding`` (1×T×D, added after the position embedding, before ``ln_pre``)
and the I3D head's ``cls_head.fc_cls`` (mean over frames of ``ln_post(CLS)``, then a linear layer) form
amflow's ZeroI2V head. STDHA (``TemporalShift`` on K and V after ``in_proj``) is not stored either: the
config's ``backbone.head_offsets`` must describe it (``shift_div=12`` on ViT-B: ``{-1: 1, +1: 1, 0: 10}``;
``shift_div=8`` on ViT-L: ``{-1: 2, +1: 2, 0: 12}``).

The release trains ``ln_post`` too, so the backbone written beside the converted checkpoint holds the
checkpoint's frozen CLIP weights with its trained final norm: with it, the converted model computes
exactly the release's logits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models import vision_transformer as timm_vit

from stage1_extract.backbone import WeightsError, file_sha256, read_state_dict
from stage1_extract.checkpoint import (
    CheckpointError,
    load_into,
    save_trainable_checkpoint,
    write_safetensors,
)
from stage1_extract.config import ConfigError
from stage2_temporal.zeroi2v import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v

PREFIX = "backbone."
BLOCKS = "backbone.transformer.resblocks."
# release adapter name -> (amflow place, the adapter's path inside a timm block)
ADAPTERS = {
    "T_Adapter_in": ("before_qkv", "attn.qkv.adapter"),
    "T_Adapter_in_q": ("before_q", "attn.qkv.adapter.q"),
    "T_Adapter_in_k": ("before_k", "attn.qkv.adapter.k"),
    "T_Adapter_in_v": ("before_v", "attn.qkv.adapter.v"),
    "S_Adapter": ("after_proj", "attn.proj.adapter"),
    "MLP_Adapter": ("before_fc1", "mlp.fc1.adapter"),
    "MLP_Adapter_out": ("after_fc2", "mlp.fc2.adapter"),
}
ADAPTER_KEY = re.compile(r"backbone\.transformer\.resblocks\.(\d+)\.(\w+?)\.D_fc([12])\.(weight|bias)")
HEAD_KEYS = {
    "backbone.temporal_embedding": "head.time_embed",
    "cls_head.fc_cls.weight": "head.fc.weight",
    "cls_head.fc_cls.bias": "head.fc.bias",
}


def is_release_checkpoint(state: dict[str, torch.Tensor]) -> bool:
    """True for the release's mmaction2 keys (``backbone.transformer.resblocks.N.T_Adapter_in...``)."""
    return any(k.startswith(BLOCKS) and ".T_Adapter_in" in k for k in state)


def read_release_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a release checkpoint (an mmengine ``.pth`` with ``state_dict``), read safely."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ZeroI2V checkpoint not found: {path}")
    try:
        state = read_state_dict(path)
    except WeightsError as e:
        raise CheckpointError(  # never advise unpickling it: a hostile pickle runs code wherever it loads
            f"{e}. amflow reads only plain tensors from a .pth; a file holding Python objects besides them "
            "is refused (get the release's weights-only checkpoint, or a .safetensors of its state_dict)"
        ) from e
    if not is_release_checkpoint(state):
        raise CheckpointError(
            f"{path}: not a ZeroI2V release checkpoint (no 'backbone.transformer.resblocks.N.T_Adapter_in*' "
            "keys)"
        )
    return state


def release_places(state: dict[str, torch.Tensor]) -> list[str]:
    """The amflow adapter places of a release checkpoint's block 0, in the order of ``ADAPTERS``."""
    found = {m.group(2) for k in state if (m := ADAPTER_KEY.fullmatch(k)) and m.group(1) == "0"}
    unknown = sorted(found - set(ADAPTERS))
    if unknown:
        raise CheckpointError(
            f"release adapters {unknown} have no amflow counterpart (known: {list(ADAPTERS)})"
        )
    return [place for name, (place, _) in ADAPTERS.items() if name in found]


def release_backbone_state(state: dict[str, torch.Tensor], model: ZeroI2VModel) -> dict[str, torch.Tensor]:
    """The release's frozen CLIP backbone (and trained ``ln_post``) in timm's ViT keys."""
    clip = {
        "visual." + k[len(PREFIX) :]: v
        for k, v in state.items()
        if k.startswith(PREFIX) and k not in HEAD_KEYS and not ADAPTER_KEY.fullmatch(k)
    }
    return timm_vit.checkpoint_filter_fn(timm_vit._convert_openai_clip(clip, model.vit), model.vit)


def release_trainable_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's adapters and head in amflow's ZeroI2V model keys."""
    out = {new: state[old] for old, new in HEAD_KEYS.items() if old in state}
    for k, v in state.items():
        m = ADAPTER_KEY.fullmatch(k)
        if m and m.group(2) in ADAPTERS:
            block, name, fc, param = m.groups()
            layer = "down" if fc == "1" else "up"
            out[f"vit.blocks.{block}.{ADAPTERS[name][1]}.{layer}.{param}"] = v
    return out


def check_release_fits(state: dict[str, torch.Tensor], cfg: ZeroI2VConfig, source: str) -> None:
    """Fails, naming the config key to change, where the checkpoint's structure differs from ``cfg``."""
    problems = []
    if "backbone.temporal_embedding" in state:
        frames = state["backbone.temporal_embedding"].shape[1]
        if frames != cfg.num_frames:
            problems.append(f"num_frames={frames} (the config says {cfg.num_frames})")
    if "cls_head.fc_cls.weight" in state:
        classes = state["cls_head.fc_cls.weight"].shape[0]
        if classes != cfg.num_classes:
            problems.append(f"num_classes={classes} (the config says {cfg.num_classes})")
    places = release_places(state)
    if sorted(places) != sorted(cfg.adapter.places):
        problems.append(f"adapter.places=[{', '.join(places)}] (the config says {cfg.adapter.places})")
    first = next(k for k in state if k.startswith(BLOCKS + "0.") and k.endswith(".D_fc1.weight"))
    bottleneck, width = state[first].shape
    if bottleneck != max(1, round(cfg.adapter.ratio * width)):
        problems.append(f"adapter.ratio={bottleneck / width:g} (bottleneck {bottleneck} of width {width})")
    if problems:
        raise ConfigError(f"{source}: the checkpoint needs {'; '.join(problems)}")


@dataclass
class ConvertSummary:
    """What ``convert_release_checkpoint`` wrote."""

    out_path: Path
    backbone_path: Path
    adapter_places: list[str]
    adapters: int
    num_frames: int
    num_classes: int
    head_offsets: list[int] | None


def default_backbone_path(out: Path) -> Path:
    """``amflow.safetensors`` -> ``amflow.backbone.safetensors``."""
    return out.with_name(f"{out.name.removesuffix('.safetensors')}.backbone.safetensors")


def convert_release_checkpoint(
    path: str | Path,
    cfg: ZeroI2VConfig,
    out_path: str | Path,
    backbone_path: str | Path | None = None,
    overwrite: bool = False,
) -> ConvertSummary:
    """Writes an amflow ZeroI2V checkpoint (adapters + head, config in the metadata) of a release file,
    and the backbone it runs on (timm keys) at ``backbone_path`` (default ``OUT.backbone.safetensors``).

    The stored config names that backbone file, so ``amflow merge``, finetuning initialisation and
    ``amflow extract --checkpoint`` take the converted checkpoint as they take amflow's own.
    """
    out = Path(out_path)
    backbone_out = Path(backbone_path) if backbone_path else default_backbone_path(out)
    for p in (out, backbone_out):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists (pass --overwrite to replace it)")
    state = read_release_checkpoint(path)
    check_release_fits(state, cfg, str(path))
    # The structure first, on the meta device: the backbone file's keys come from timm's own model.
    with torch.device("meta"):
        skeleton = build_zeroi2v(dataclasses.replace(cfg, backbone=_no_weights(cfg)))
    backbone = release_backbone_state(state, skeleton)
    expected = set(skeleton.vit.state_dict()) - {k for k in skeleton.vit.state_dict() if "adapter" in k}
    if set(backbone) != expected:
        raise CheckpointError(
            f"{path}: its CLIP backbone does not fit {cfg.backbone.name!r}: missing "
            f"{sorted(expected - set(backbone))[:4]}, unexpected {sorted(set(backbone) - expected)[:4]}"
        )
    write_safetensors(backbone, backbone_out, {"format": "timm", "converted_from": str(path)})
    b = dataclasses.replace(cfg.backbone, weights=str(backbone_out.resolve()), pretrained=False)
    model = build_zeroi2v(dataclasses.replace(cfg, backbone=b))
    trainable = release_trainable_state(state)
    try:
        load_into(model, trainable, path)
    except CheckpointError:
        backbone_out.unlink(missing_ok=True)
        raise
    meta = {"converted_from": str(path), "converted_from_sha256": file_sha256(path) or ""}
    save_trainable_checkpoint(model, model.config, out, meta)
    return ConvertSummary(
        out_path=out,
        backbone_path=backbone_out,
        adapter_places=release_places(state),
        adapters=len(release_places(state)) * len(model.vit.blocks),
        num_frames=model.num_frames,
        num_classes=cfg.num_classes,
        head_offsets=model.config.backbone.head_offsets,
    )


def _no_weights(cfg: ZeroI2VConfig):
    return dataclasses.replace(cfg.backbone, weights=None, pretrained=False)


def load_release_config(config: str | Path, overrides: Sequence[str] = ()) -> ZeroI2VConfig:
    """A model YAML that must be ``kind: zeroi2v``, with overrides."""
    from stage2_temporal.models import load_model_config

    cfg = load_model_config(config, overrides)
    if not isinstance(cfg, ZeroI2VConfig):
        raise ConfigError(f"{config}: a release ZeroI2V checkpoint needs a 'kind: zeroi2v' model config")
    return cfg

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
exactly the release's logits. The converted config also trains like the release when finetuned
(:data:`RELEASE_TRAINING`): dropout 0.5 before the classifier (``I3DHead(dropout_ratio=0.5)``), a
trainable final norm, and the release's pixel mean/std exactly (its ``data_preprocessor``, on 0-255).

Nothing in the file is dropped or resized silently: unknown keys, unknown adapter names in any block,
a position embedding for another grid and tensors of the wrong shape are refused before anything is
written.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models import vision_transformer as timm_vit

from foundation.config import ConfigError
from foundation.files import file_sha256
from stage1_extract.families.backbone import RANDOM_INIT_WARNING, WeightsError, read_state_dict
from stage1_extract.methods.checkpoint import (
    CheckpointError,
    load_into,
    save_trainable_checkpoint,
    write_safetensors,
)
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v

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
# The release's configs (configs/recognition/vit_zero_clip/*.py): data_preprocessor mean/std on 0-255
# pixels (timm's OpenAI values differ in the 5th digit), I3DHead dropout_ratio=0.5, ln_post trained.
RELEASE_MEAN = (122.769, 116.74, 104.04)
RELEASE_STD = (68.493, 66.63, 70.321)
RELEASE_TRAINING = {"head_dropout": 0.5, "train_norm": True}


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
    """The amflow adapter places of a release checkpoint's block 0, in the order of ``ADAPTERS``; an
    adapter name amflow does not know, in any block, is refused (it would otherwise be dropped)."""
    blocks: dict[str, set[str]] = {}
    for k in state:
        if m := ADAPTER_KEY.fullmatch(k):
            blocks.setdefault(m.group(2), set()).add(m.group(1))
    unknown = {name: sorted(b, key=int) for name, b in blocks.items() if name not in ADAPTERS}
    if unknown:
        where = ", ".join(f"{name} (blocks {', '.join(b)})" for name, b in sorted(unknown.items()))
        raise CheckpointError(
            f"release adapters {where} have no amflow counterpart (known: {list(ADAPTERS)})"
        )
    return [place for name, (place, _) in ADAPTERS.items() if "0" in blocks.get(name, ())]


def check_release_keys(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuses keys that are neither the backbone's (``backbone.``) nor the head's: never dropped silently."""
    unknown = sorted(k for k in state if not k.startswith(PREFIX) and k not in HEAD_KEYS)
    if unknown:
        raise CheckpointError(
            f"{source}: keys {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are neither the backbone's "
            f"nor the I3D head's (cls_head.fc_cls); amflow would drop them"
        )


def check_position_grid(state: dict[str, torch.Tensor], model: ZeroI2VModel, cfg: ZeroI2VConfig) -> None:
    """The release's ``positional_embedding`` must be for the config's patch grid: timm's filter would
    resize it silently (a model of other logits); refused, naming the ``img_size`` it was trained at."""
    pos = state.get(PREFIX + "positional_embedding")
    if pos is None:
        return
    want = model.vit.pos_embed.shape[1]
    if pos.shape[0] == want:
        return
    side = math.isqrt(pos.shape[0] - 1)
    patch = model.vit.patch_embed.patch_size[0]
    grid = "x".join(str(g) for g in model.vit.patch_embed.grid_size)
    hint = f"; set backbone.img_size={side * patch}" if side * side == pos.shape[0] - 1 else ""
    raise ConfigError(
        f"positional_embedding: {pos.shape[0]} tokens ({side}x{side} patches + CLS), but the config's "
        f"backbone makes a {grid} grid ({want} tokens){hint} (resizing it would change every logit)"
    )


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
    check_release_keys(state, str(path))
    check_release_fits(state, cfg, str(path))
    cfg = release_training_config(cfg)
    # The structure first, on the meta device: the backbone file's keys come from timm's own model.
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)  # its weights are loaded below
        skeleton = build_zeroi2v(dataclasses.replace(cfg, backbone=_no_weights(cfg)))
    check_position_grid(state, skeleton, cfg)
    backbone = release_backbone_state(state, skeleton)
    want = {k: v for k, v in skeleton.vit.state_dict().items() if "adapter" not in k}
    if set(backbone) != set(want):
        raise CheckpointError(
            f"{path}: its CLIP backbone does not fit {cfg.backbone.name!r}: missing "
            f"{sorted(set(want) - set(backbone))[:4]}, unexpected {sorted(set(backbone) - set(want))[:4]}"
        )
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(want[k].shape)})"
        for k, v in backbone.items()
        if v.shape != want[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: backbone tensors of the wrong shape: {'; '.join(wrong[:3])}")
    write_safetensors(backbone, backbone_out, {"format": "timm", "converted_from": str(path)})
    try:
        b = dataclasses.replace(cfg.backbone, weights=str(backbone_out.resolve()), pretrained=False)
        model = build_zeroi2v(dataclasses.replace(cfg, backbone=b))
        trained = {n for n, q in model.named_parameters() if q.requires_grad}  # with the final norm
        trainable = release_trainable_state(state)
        trainable |= {f"vit.{k}": v for k, v in backbone.items() if f"vit.{k}" in trained}
        load_into(model, trainable, path)
        meta = {"converted_from": str(path), "converted_from_sha256": file_sha256(path) or ""}
        save_trainable_checkpoint(model, model.config, out, meta)
    except BaseException:  # never leave a backbone without its checkpoint
        backbone_out.unlink(missing_ok=True)
        raise
    return ConvertSummary(
        out_path=out,
        backbone_path=backbone_out,
        adapter_places=release_places(state),
        adapters=len(release_places(state)) * len(model.vit.blocks),
        num_frames=model.num_frames,
        num_classes=cfg.num_classes,
        head_offsets=model.config.backbone.head_offsets,
    )


def release_training_config(cfg: ZeroI2VConfig) -> ZeroI2VConfig:
    """``cfg`` with the release's training set-up (:data:`RELEASE_TRAINING`) and its exact pixel mean/std
    (timm's ``pretrained_cfg_overlay``, read by every amflow command that normalises frames)."""
    overlay = {"mean": [m / 255 for m in RELEASE_MEAN], "std": [s / 255 for s in RELEASE_STD]}
    kwargs = dict(cfg.backbone.timm_kwargs)
    kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), **overlay}
    backbone = dataclasses.replace(cfg.backbone, timm_kwargs=kwargs)
    return dataclasses.replace(cfg, backbone=backbone, **RELEASE_TRAINING)


def _no_weights(cfg: ZeroI2VConfig):
    return dataclasses.replace(cfg.backbone, weights=None, pretrained=False)


def load_release_config(config: str | Path, overrides: Sequence[str] = ()) -> ZeroI2VConfig:
    """A model YAML that must be ``kind: zeroi2v``, with overrides."""
    from stage2_temporal.finetuning.models import load_model_config

    cfg = load_model_config(config, overrides)
    if not isinstance(cfg, ZeroI2VConfig):
        raise ConfigError(f"{config}: a release ZeroI2V checkpoint needs a 'kind: zeroi2v' model config")
    return cfg

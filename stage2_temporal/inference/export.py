"""``amflow export``: everything ``amflow predict`` needs in one safetensors file, no run directory.

Tensors: the whole model under ``model.`` (frozen backbone included, so no weights file is needed: the
AM-flow extraction model with its adapters for a train-heads run, the finetuned model, or the merged
ZeroI2V backbone and head) and, for a train-heads run, its heads under ``heads.``. The metadata key
``amflow_predictor`` holds the JSON record: kind, model config, dataset config (frames, sampling, clips,
crops, crop size), class names, input normalisation, the heads' shape and the cache dtype they read.

The file is untrusted data when it is read back (``foundation.formats``): its content hash and finite
weights are checked, the model and heads are built on the meta device from the record and must fit the
tensors exactly before anything is allocated, the decoding sizes must agree with the model and stay
bounded, the class list must fit the classifier, and no path or download in the record is acted on.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from foundation.config import build_config, config_to_dict
from foundation.formats import (
    EXPORT_FORMAT,
    EXPORT_RECORD_KEY,
    FORMAT_KEY,
    CheckpointError,
    check_fits,
    check_video_size,
    load_safetensors,
    read_metadata,
    tensor_shapes,
    without_sources,
    write_safetensors,
)
from stage1_extract.families.backbone import RANDOM_INIT_WARNING
from stage1_extract.features import build_feature_extractor
from stage1_extract.methods.linear_adapters import merge_linear_adapters
from stage1_extract.methods.models import feature_config_from_dict
from stage1_extract.videos.datasets import DatasetConfig
from stage2_temporal.finetuning.models import build_model, model_config_from_dict
from stage2_temporal.inference.predict import PREDICTORS, Predictor
from stage2_temporal.training.run_dir import HeadsInfo
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v

RECORD_KEY = EXPORT_RECORD_KEY
FEATURE_DTYPES = ("float16", "bfloat16", "float32")
RECORD_KEYS = ("kind", "model_config", "data_config", "class_names", "heads_info")


def export_predictor(predictor: Predictor, out: str | Path, overwrite: bool = False) -> Path:
    """Writes ``predictor`` as one safetensors file (atomically); returns its path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out}: exists (pass --overwrite to replace it)")
    model_cfg = json.loads(json.dumps(predictor.model_config))
    model_cfg.setdefault("backbone", {})["weights"] = None  # the backbone's weights travel in the file
    record = {
        "kind": predictor.kind,
        "model_config": model_cfg,
        "data_config": config_to_dict(predictor.data),
        "class_names": predictor.class_names,
        "pixel_mean": predictor.pixel_mean,
        "pixel_std": predictor.pixel_std,
        "feature_dtype": predictor.feature_dtype,
        "heads_info": config_to_dict(predictor.heads_info) if predictor.heads_info else None,
    }
    tensors = {f"model.{k}": v for k, v in predictor.model.state_dict().items()}
    if predictor.heads is not None:
        tensors.update({f"heads.{k}": v for k, v in predictor.heads.state_dict().items()})
    write_safetensors(tensors, out, {FORMAT_KEY: EXPORT_FORMAT, RECORD_KEY: json.dumps(record)})
    return out


def _build(kind: str, model_cfg: dict[str, Any], source: str) -> torch.nn.Module:
    """An empty model of the exported kind (its weights are loaded from the file next)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        if kind == "heads":  # stage 1's feature model; the heads are stored beside it
            return build_feature_extractor(feature_config_from_dict(model_cfg, f"{source} (model config)"))
        cfg = model_config_from_dict(model_cfg, f"{source} (model config)")
        if kind != "merged":
            return build_model(cfg)
        if not isinstance(cfg, ZeroI2VConfig):
            raise ValueError(f"{source}: a merged model must be ZeroI2V, got kind {cfg.kind!r}")
        model = build_zeroi2v(cfg)
    merge_linear_adapters(model.vit)  # the plain ViT's modules (STDHA kept), as the merged weights expect
    return ZeroI2VModel(model.vit, model.head)


def _read_record(path: str | Path, meta: dict[str, str]) -> dict[str, Any]:
    """The export's JSON record, its keys and simple values checked (one line naming the file)."""
    if meta.get(FORMAT_KEY) != EXPORT_FORMAT or RECORD_KEY not in meta:
        raise CheckpointError(f"{path}: not an amflow export (metadata format {meta.get(FORMAT_KEY)!r})")
    try:
        record = json.loads(meta[RECORD_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata '{RECORD_KEY}' is not valid JSON: {e}") from e
    if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
        raise CheckpointError(f"{path}: metadata '{RECORD_KEY}' lacks one of {list(RECORD_KEYS)}")
    if record["kind"] not in ("heads", "finetune", "merged"):
        raise CheckpointError(f"{path}: unknown model kind {record['kind']!r}")
    names = record["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: class_names must be a non-empty list of names")
    if record.get("feature_dtype", "float32") not in FEATURE_DTYPES:
        raise CheckpointError(f"{path}: feature_dtype must be one of {FEATURE_DTYPES}")
    for key in ("pixel_mean", "pixel_std"):
        value = record.get(key)
        ok = isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)
        if value is not None and not (ok and all(math.isfinite(v) for v in value)):
            raise CheckpointError(f"{path}: {key} must be 3 finite numbers, got {value!r}")
    if record.get("pixel_std") and min(record["pixel_std"]) <= 0:
        raise CheckpointError(f"{path}: pixel_std must be > 0, got {record['pixel_std']}")
    return record


def load_export(path: str | Path, device: str = "auto") -> Predictor:
    """The predictor written by ``export_predictor``, validated as untrusted data (module docstring)."""
    from foundation.devices import resolve_device

    meta = read_metadata(path)
    record = _read_record(path, meta)
    model_cfg = without_sources(record["model_config"], path)
    shapes = tensor_shapes(path)
    with torch.device("meta"):  # the record's sizes must fit the tensors before anything is allocated
        check_fits(_build(record["kind"], model_cfg, str(path)), _part(shapes, "model."), path)
        info = None
        if record["heads_info"] is not None:
            info = build_config(HeadsInfo, record["heads_info"], f"{path} (heads_info)")
            check_fits(info.build(), _part(shapes, "heads."), path, "the heads")
    data = build_config(DatasetConfig, record["data_config"], f"{path} (data_config)")
    _check_data(data, model_cfg, path)
    tensors = load_safetensors(path, meta)  # content hash, finite weights
    model = _build(record["kind"], model_cfg, str(path))
    model.load_state_dict(_part(tensors, "model."), strict=True)
    heads = None
    if info is not None:
        heads = info.build()
        heads.load_state_dict(_part(tensors, "heads."), strict=True)
    names = list(record["class_names"])
    classes = info.num_classes if info is not None else model_cfg.get("num_classes")
    if classes is not None and len(names) != classes:
        raise CheckpointError(f"{path}: {len(names)} class names for a classifier of {classes} classes")
    feature_dtype = record.get("feature_dtype", "float32")
    parts = dict(heads=heads, heads_info=info, feature_dtype=feature_dtype) if heads is not None else {}
    return PREDICTORS[record["kind"]](
        model,
        data,
        names,
        model_cfg,
        device=resolve_device(device),
        pixel_mean=record.get("pixel_mean"),
        pixel_std=record.get("pixel_std"),
        **parts,
    )


def _part(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_data(data: DatasetConfig, model_cfg: dict[str, Any], path: str | Path) -> None:
    """The decoding sizes must be the model's (frames, crop) and bounded."""
    frames = model_cfg.get("num_frames")
    if frames is not None and data.num_frames != frames:
        raise CheckpointError(
            f"{path}: data_config num_frames={data.num_frames} but the model takes {frames} frames"
        )
    img_size = (model_cfg.get("backbone") or {}).get("img_size")
    if data.crop_size is not None and img_size is not None and data.crop_size != img_size:
        raise CheckpointError(
            f"{path}: data_config crop_size={data.crop_size} but the model takes {img_size} px"
        )
    crop = data.crop_size or img_size or 224
    check_video_size(data.num_frames, data.num_clips, data.num_crops, crop, f"{path} (data_config)")

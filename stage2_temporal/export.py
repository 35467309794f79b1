"""``amflow export``: everything ``amflow predict`` needs in one safetensors file, no run directory.

Tensors: the whole model under ``model.`` (frozen backbone included, so no weights file is needed: the
AM-flow extraction model with its adapters for a train-heads run, the finetuned model, or the merged
ZeroI2V backbone and head) and, for a train-heads run, its heads under ``heads.``. The metadata key
``amflow_predictor`` holds the JSON record: kind, model config, dataset config (frames, sampling, clips,
crops, crop size), class names, input normalisation, the heads' shape and the cache dtype they read.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stage1_extract.backbone import RANDOM_INIT_WARNING
from stage1_extract.checkpoint import FORMAT_KEY, read_metadata, write_safetensors
from stage1_extract.config import build_config, config_to_dict
from stage1_extract.datasets import DatasetConfig
from stage1_extract.features import build_feature_extractor
from stage1_extract.linear_adapters import merge_linear_adapters
from stage1_extract.models import feature_config_from_dict
from stage2_temporal.models import build_model, model_config_from_dict
from stage2_temporal.predict import PREDICTORS, Predictor
from stage2_temporal.run_dir import HeadsInfo
from stage2_temporal.zeroi2v import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v

EXPORT_FORMAT = "amflow-predictor-1"
RECORD_KEY = "amflow_predictor"


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


def load_export(path: str | Path, device: str = "auto") -> Predictor:
    """The predictor written by ``export_predictor``."""
    from stage1_extract.backbone import resolve_device

    meta = read_metadata(path)
    if meta.get(FORMAT_KEY) != EXPORT_FORMAT or RECORD_KEY not in meta:
        raise ValueError(f"{path}: not an amflow export (metadata format {meta.get(FORMAT_KEY)!r})")
    record = json.loads(meta[RECORD_KEY])
    tensors = load_file(str(path))
    model = _build(record["kind"], record["model_config"], str(path))
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the model tensors do not fit its config: {e}") from e
    heads = info = None
    if record["heads_info"] is not None:
        info = build_config(HeadsInfo, record["heads_info"], f"{path} (heads_info)")
        heads = info.build()
        heads.load_state_dict({k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")})
    parts = (
        dict(heads=heads, heads_info=info, feature_dtype=record["feature_dtype"]) if heads is not None else {}
    )
    return PREDICTORS[record["kind"]](
        model,
        build_config(DatasetConfig, record["data_config"], f"{path} (data_config)"),
        list(record["class_names"]),
        record["model_config"],
        device=resolve_device(device),
        pixel_mean=record["pixel_mean"],
        pixel_std=record["pixel_std"],
        **parts,
    )

"""Predicting actions in new videos with a trained run: stage 1 in memory, then the run's classifier.

A ``Predictor`` holds what scoring a video needs: the model, how clips are sampled into views (the
dataset config of the run's features or finetuning), the input normalisation and the class names. Three
kinds, all averaging the softmax probabilities over a video's views as evaluation does:

- ``heads``: a ``train-heads`` run: the AM-flow extraction model rebuilt from the config recorded with the
  run's features (stage 1 in memory), features rounded through the cache's dtype as the heads saw them,
  then the run's heads;
- ``finetune``: an end-to-end finetuning run (AM flow or ZeroI2V), its ``best.safetensors``;
- ``merged``: a merged ZeroI2V model (``amflow merge``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stage1_extract.amflow_model import ClipFeatures
from stage1_extract.backbone import (
    RANDOM_INIT_WARNING,
    file_sha256,
    normalise_video,
    pixel_stats,
    resolve_device,
)
from stage1_extract.checkpoint import (
    FORMAT_KEY,
    check_backbone_weights,
    load_into,
    load_trainable_checkpoint,
    read_config,
    read_metadata,
)
from stage1_extract.config import ConfigError, build_config, config_to_dict, read_yaml
from stage1_extract.datasets import VIDEO_EXTENSIONS, ClipRecord, DatasetConfig
from stage1_extract.extract import load_extraction_model
from stage1_extract.formats import read_class_names
from stage1_extract.models import feature_config_from_dict
from stage1_extract.video import VideoClipDataset, collate_clips
from stage1_extract.zeroi2v import MERGED_FORMAT
from stage2_temporal.data import CachedFeatures
from stage2_temporal.heads import AveragingClassifier
from stage2_temporal.models import build_model, model_config_from_dict
from stage2_temporal.predictions import class_labels
from stage2_temporal.run_dir import (
    CONFIG_FILE,
    FINGERPRINT_FILE,
    HEADS_FILE,
    HeadsInfo,
    load_heads,
    read_json,
)
from stage2_temporal.train import predict_proba, select_for_heads
from stage2_temporal.zeroi2v import ZeroI2VModel, load_merged

log = logging.getLogger(__name__)

FINETUNE_BEST = "best.safetensors"
KINDS = ("heads", "finetune", "merged")


@dataclass
class Predictor:
    """A trained recogniser ready for videos (see the module docstring for the three kinds)."""

    kind: str
    model: nn.Module  # heads: the AM-flow extraction model; else the video classifier (logits)
    data: DatasetConfig  # sampling, frames, views and crop size of the clips
    class_names: list[str]
    model_config: dict[str, Any]
    heads: AveragingClassifier | None = None
    heads_info: HeadsInfo | None = None
    feature_dtype: str = "float32"  # heads: the cache dtype the heads were trained on
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pixel_mean: list[float] | None = None  # input normalisation; None = the backbone's pretrained_cfg
    pixel_std: list[float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"predictor kind: expected one of {KINDS}, got {self.kind!r}")
        self.model.eval().to(self.device)
        if self.heads is not None:
            self.heads.eval().to(self.device)
        self.mean, self.std = pixel_stats(self.model.vit, self.device)
        if self.pixel_mean is not None and self.pixel_std is not None:
            self.mean = torch.tensor(self.pixel_mean, device=self.device).view(3, 1, 1)
            self.std = torch.tensor(self.pixel_std, device=self.device).view(3, 1, 1)
        self.pixel_mean, self.pixel_std = self.mean.flatten().tolist(), self.std.flatten().tolist()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_views(self) -> int:
        return self.data.num_clips * self.data.num_crops

    @torch.inference_mode()
    def probabilities(self, video: torch.Tensor) -> np.ndarray:
        """uint8 views (B, V, T, 3, H, W) -> class probabilities (B, C), softmax averaged over the V views."""
        B, V = video.shape[:2]
        on_cuda = self.device.type == "cuda"
        x = normalise_video(video.to(self.device, non_blocking=on_cuda).flatten(0, 1), self.mean, self.std)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            if self.kind != "heads":
                logits = self.model(x).float()
                return logits.softmax(dim=-1).double().reshape(B, V, -1).mean(dim=1).cpu().numpy()
            f = self.model.extract(x)
        dtype = getattr(torch, self.feature_dtype)

        def cached(t: torch.Tensor, v: int) -> torch.Tensor:
            """View ``v`` of every clip, rounded through the cache's dtype as stage 2 read it."""
            return t.float().unflatten(0, (B, V))[:, v].to(dtype).float().cpu()

        views = [ClipFeatures(cached(f.embeddings, v), cached(f.cls, v), cached(f.flow, v)) for v in range(V)]
        m = self.model
        data = CachedFeatures.from_clip_features(
            views,
            np.zeros(B, dtype=np.int64),
            self.num_classes,
            m.adapter_names,
            m.flow_block_names,
            patch_grid=m.patch_grid,
            num_prefix_tokens=m.num_prefix_tokens,
        )
        data = select_for_heads(data, self.heads_info)
        return predict_proba(self.heads, data, batch_size=max(B, 1), device=self.device)


# --------------------------------------------------------------------------------------------- loading


def _with_weights(model_cfg: dict[str, Any], weights: str | None) -> dict[str, Any]:
    cfg = json.loads(json.dumps(model_cfg))
    cfg.setdefault("backbone", {})["weights"] = weights
    return cfg


def _check_sha(path: str | None, recorded: str | None, what: str, option: str, run: Path) -> None:
    """The file must be the one the run's features were made with (same SHA-256), or absent for none."""
    if recorded and not path:
        raise ConfigError(
            f"{run}: its features were made with {what} (SHA-256 {recorded[:12]}...); pass it with {option}"
        )
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if path and recorded and file_sha256(path) != recorded:
        raise ConfigError(
            f"{option} {path}: not the {what} the run's features were made with (SHA-256 {recorded[:12]}...)"
        )
    if path and not recorded:
        raise ConfigError(f"{option} {path}: the run's features were made without {what}")


def _crop_size(data: DatasetConfig, model_cfg: Any) -> DatasetConfig:
    if data.crop_size is None:
        data = dataclasses.replace(data, crop_size=model_cfg.backbone.img_size)
    if data.crop_size is None:
        raise ConfigError("the run records no crop size and its model no backbone.img_size")
    return data


def load_heads_predictor(
    run_dir: str | Path, weights: str | None = None, checkpoint: str | None = None, device: str = "auto"
) -> Predictor:
    """A ``train-heads`` run: stage 1 rebuilt from the features' recorded config, then the run's heads.

    ``weights`` / ``checkpoint`` replace the recorded paths (e.g. moved files); their SHA-256 must be the
    one recorded in the run's feature fingerprint.
    """
    run = Path(run_dir)
    record_path = run / FINGERPRINT_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: not found; {run} is not a run of amflow train-heads")
    record = read_json(record_path)
    fields = record.get("fingerprint_fields") or {}
    features = record.get("features") or {}
    config = features.get("config") or {}
    model_dict = config.get("model") or fields.get("model")
    data_dict = config.get("dataset") or fields.get("data")
    if not isinstance(model_dict, dict) or not isinstance(data_dict, dict) or "backbone" not in model_dict:
        raise ConfigError(
            f"{record_path}: records no stage-1 model config (a run on features of unknown origin)"
        )
    weights = weights or features.get("weights")
    checkpoint = checkpoint or features.get("checkpoint")
    _check_sha(weights, fields.get("weights_sha256"), "backbone weights", "--weights", run)
    _check_sha(checkpoint, fields.get("checkpoint_sha256"), "a checkpoint", "--checkpoint", run)
    model_cfg = feature_config_from_dict(_with_weights(model_dict, weights), f"{record_path} (model config)")
    data = _crop_size(build_config(DatasetConfig, data_dict, f"{record_path} (dataset config)"), model_cfg)
    heads, info = load_heads(run)
    dev = resolve_device(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        model = load_extraction_model(model_cfg, checkpoint, torch.device("cpu"))
    names = class_labels(info.class_names or features.get("classes"), info.num_classes)
    return Predictor(
        "heads",
        model,
        data,
        names,
        config_to_dict(model.cfg),  # with a merged backbone's head offsets
        heads=heads,
        heads_info=info,
        feature_dtype=fields.get("dtype") or "float32",
        device=dev,
    )


def load_finetune_predictor(
    run_dir: str | Path, weights: str | None = None, checkpoint: str | None = None, device: str = "auto"
) -> Predictor:
    """An end-to-end finetuning run: its ``best.safetensors`` (or ``checkpoint``) on its dataset sampling."""
    run = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint else run / FINETUNE_BEST
    resolved = read_yaml(run / CONFIG_FILE)
    if not isinstance(resolved.get("data"), dict):
        raise ConfigError(f"{run / CONFIG_FILE}: no 'data' mapping (not the config.yaml of amflow finetune)")
    state, cfg = load_trainable_checkpoint(ckpt)
    if weights:
        cfg = _with_weights(cfg, weights)
    check_backbone_weights(ckpt, cfg)
    model_cfg = model_config_from_dict(cfg, f"{ckpt} (metadata 'config')")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        model = build_model(model_cfg)
    load_into(model, state, ckpt)
    data = _crop_size(build_config(DatasetConfig, resolved["data"], f"{run / CONFIG_FILE} (data)"), model_cfg)
    names = read_class_names(read_metadata(ckpt), ckpt, model_cfg.num_classes)
    return Predictor(
        "finetune",
        model,
        data,
        class_labels(names, model_cfg.num_classes),
        config_to_dict(getattr(model, "config", None) or model_cfg),
        device=resolve_device(device),
    )


def load_merged_predictor(
    path: str | Path, device: str = "auto", data: DatasetConfig | None = None
) -> Predictor:
    """A merged ZeroI2V model: one centre clip of ``num_frames`` uniformly sampled frames unless ``data``."""
    meta = read_metadata(path)
    vit, head = load_merged(path)
    model = ZeroI2VModel(vit, head)
    cfg = model_config_from_dict(read_config(path, meta), f"{path} (metadata 'config')")
    data = data or DatasetConfig(num_frames=cfg.num_frames, crop_size=cfg.backbone.img_size)
    names = read_class_names(meta, path, cfg.num_classes)
    return Predictor(
        "merged",
        model,
        _crop_size(data, cfg),
        class_labels(names, cfg.num_classes),
        config_to_dict(cfg),
        device=resolve_device(device),
    )


def load_predictor(
    run: str | Path | None = None,
    model: str | Path | None = None,
    *,
    weights: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
) -> Predictor:
    """The predictor of a run directory (train-heads or finetune) or of a model file (export or merged)."""
    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run RUN_DIR and --model FILE")
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise FileNotFoundError(f"--run {run}: no such run directory")
        if (run / HEADS_FILE).is_file():
            return load_heads_predictor(run, weights, checkpoint, device)
        if (run / FINETUNE_BEST).is_file() or checkpoint:
            return load_finetune_predictor(run, weights, checkpoint, device)
        raise FileNotFoundError(
            f"--run {run}: neither {HEADS_FILE} (amflow train-heads) nor {FINETUNE_BEST} (amflow finetune)"
        )
    if weights or checkpoint:
        raise ValueError("--weights and --checkpoint go with --run; a --model file holds its own weights")
    meta = read_metadata(model)
    from stage2_temporal.export import EXPORT_FORMAT, load_export

    if meta.get(FORMAT_KEY) == EXPORT_FORMAT:
        return load_export(model, device=device)
    if meta.get(FORMAT_KEY) == MERGED_FORMAT:
        return load_merged_predictor(model, device=device)
    raise ValueError(
        f"--model {model}: neither an export (amflow export) nor a merged ZeroI2V model (amflow merge)"
    )


# ------------------------------------------------------------------------------------------- predicting


@dataclass
class VideoPrediction:
    """One scored video (or window of one): the path as given, probabilities, or why it failed."""

    video: str
    probs: np.ndarray | None = None
    error: str | None = None
    start: float | None = None  # seconds, for windows of a long video
    end: float | None = None


def expand_videos(inputs: Sequence[str]) -> list[str]:
    """Video files as given, and the video files under each folder given (sorted, recursively)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                raise FileNotFoundError(
                    f"{item}: a folder with no video file ({', '.join(VIDEO_EXTENSIONS)})"
                )
            out.extend(found)
        else:
            out.append(item)  # a missing file is reported and skipped with the undecodable ones
    return out


def predict_records(
    predictor: Predictor,
    records: Sequence[ClipRecord],
    batch_size: int = 8,
    decode_workers: int = 2,
    progress: bool = True,
    desc: str = "predict",
) -> list[tuple[np.ndarray | None, str | None]]:
    """(probabilities, None) or (None, error) per record, decoded as the run's clips were."""
    # the videos are the user's own paths, not an annotation file's: no dataset root confines them
    dataset = VideoClipDataset(records, None, predictor.data, crop_size=predictor.data.crop_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=decode_workers,
        collate_fn=collate_clips,
        pin_memory=predictor.device.type == "cuda",
    )
    results: list[tuple[np.ndarray | None, str | None]] = [(None, "not decoded")] * len(records)
    with tqdm(total=len(records), desc=desc, unit="clip", disable=not progress, leave=False) as bar:
        for batch in loader:
            for item in batch["failed"]:
                results[item["index"]] = (None, f"{item['error'][0]}: {item['error'][1]}")
            if batch["video"] is not None:
                probs = predictor.probabilities(batch["video"])
                for j, i in enumerate(batch["index"].tolist()):
                    results[i] = (probs[j], None)
            bar.update(len(batch["index"]) + len(batch["failed"]))
    return results


def predict_videos(
    predictor: Predictor,
    videos: Sequence[str],
    batch_size: int = 8,
    decode_workers: int = 2,
    progress: bool = True,
) -> list[VideoPrediction]:
    """Scores whole videos (paths as given); undecodable ones come back with ``error`` set."""
    records = [ClipRecord(v, -1) for v in videos]
    results = predict_records(predictor, records, batch_size, decode_workers, progress)
    return [VideoPrediction(v, probs, error) for v, (probs, error) in zip(videos, results)]


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first: ``[{"label", "prob"}, ...]``."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": class_names[i], "prob": float(probs[i])} for i in order]


def format_prediction(p: VideoPrediction, class_names: Sequence[str], k: int = 5) -> str:
    """A small table: the video (and window), then its top-k classes with probabilities."""
    where = p.video if p.start is None else f"{p.video} [{p.start:.2f} s, {p.end:.2f} s)"
    if p.probs is None:
        return f"{where}\n  failed: {p.error}"
    width = max(len(c) for c in class_names) + 2
    rows = [
        f"  {r + 1}. {t['label']:<{width}}{100 * t['prob']:6.2f}%"
        for r, t in enumerate(top_k(p.probs, class_names, k))
    ]
    return "\n".join([where, *rows])


def prediction_json(p: VideoPrediction, class_names: Sequence[str], k: int = 5) -> str:
    """One JSON line: ``{"video": ..., "top5": [{"label", "prob"}, ...]}`` (windows add start and end)."""
    out: dict[str, Any] = {"video": p.video}
    if p.start is not None:
        out.update(start=p.start, end=p.end)
    out[f"top{k}"] = top_k(p.probs, class_names, k)
    return json.dumps(out)


def write_top_k_csv(
    predictions: Sequence[VideoPrediction], class_names: Sequence[str], path: str | Path, k: int = 5
) -> Path:
    """``video[,start,end],label1,prob1,...,labelk,probk`` per scored video or window (failures left out);
    ``k`` is at most the number of classes, so the header always matches the rows."""
    import csv

    from store.atomic import atomic_path

    k = min(k, len(class_names))
    windows = any(p.start is not None for p in predictions)
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        ranks = [c for r in range(1, k + 1) for c in (f"label{r}", f"prob{r}")]
        writer.writerow(["video", *(["start", "end"] if windows else []), *ranks])
        for p in predictions:
            if p.probs is None:
                continue
            cells = [c for t in top_k(p.probs, class_names, k) for c in (t["label"], f"{t['prob']:.6f}")]
            span = [f"{p.start:.3f}", f"{p.end:.3f}"] if windows else []
            writer.writerow([p.video, *span, *cells])
    return path

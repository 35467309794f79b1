"""Predicting actions in new videos with a trained model: one ``Predictor`` interface whatever made it.

A predictor scores clips (``forward``: uint8 views -> class probabilities, the softmax averaged over a
video's views as evaluation does) and knows how clips are sampled into views (the dataset config of the
run's features or finetuning), the input normalisation and the class names. One class per source, each
with the ``kind`` an export records (``amflow export``; ``PREDICTORS`` maps it back to the class):

- ``HeadsPredictor`` (``heads``): a ``train-heads`` run: the feature model rebuilt from the config
  recorded with the run's features (stage 1 in memory), features rounded through the cache's dtype as
  the heads saw them, then the run's heads;
- ``FinetunePredictor`` (``finetune``): an end-to-end finetuning run (AM flow or ZeroI2V), its
  ``best.safetensors``;
- ``MergedPredictor`` (``merged``): a merged ZeroI2V model (``amflow merge``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from foundation.config import ConfigError, build_config, config_to_dict, read_yaml
from foundation.devices import resolve_device
from foundation.features import ClipFeatures
from foundation.files import file_sha256
from foundation.formats import read_class_names
from stage1_extract.extraction.block_maps import pack_block_maps
from stage1_extract.extraction.extract import load_extraction_model
from stage1_extract.families.backbone import RANDOM_INIT_WARNING, normalise_video
from stage1_extract.features import FeatureExtractor
from stage1_extract.methods.checkpoint import (
    FORMAT_KEY,
    check_backbone_weights,
    load_into,
    load_trainable_checkpoint,
    read_config,
    read_metadata,
)
from stage1_extract.methods.models import feature_config_from_dict
from stage1_extract.methods.zeroi2v import MERGED_FORMAT
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import VIDEO_EXTENSIONS, ClipRecord, DatasetConfig
from stage1_extract.videos.video import VideoClipDataset, collate_clips
from stage2_temporal.finetuning.models import build_model, model_config_from_dict
from stage2_temporal.heads import AveragingClassifier
from stage2_temporal.training.data import CachedFeatures
from stage2_temporal.training.predictions import class_labels
from stage2_temporal.training.run_dir import (
    CONFIG_FILE,
    FINGERPRINT_FILE,
    HEADS_FILE,
    HeadsInfo,
    load_heads,
    read_json,
)
from stage2_temporal.training.train import predict_proba, select_for_heads
from stage2_temporal.zeroi2v.model import ZeroI2VModel, load_merged

log = logging.getLogger(__name__)

FINETUNE_BEST = "best.safetensors"


class Predictor(metaclass=ABCMeta):
    """A trained recogniser ready for videos: ``forward`` (or calling it) scores a batch of clips.

    Args:
        model: the network an export saves (the feature model for heads, else the video classifier).
        data: the dataset config of the clips (crop size set), recorded in exports; ``geometry`` is
            the resolved sampling, views, crop, normalisation and class names the predictor decodes with.
        class_names: one name per class, in the model's order.
        model_config: the resolved model config (recorded in exports).
        device: where the model runs.
        pixel_mean, pixel_std: the input normalisation; None = the backbone's pretrained_cfg.
    """

    kind: ClassVar[str]  # what an export records; ``PREDICTORS[kind]`` loads it back
    # What an export stores beside the model: trained heads, their shape, the cache dtype they read.
    heads: AveragingClassifier | None = None
    heads_info: HeadsInfo | None = None
    feature_dtype: str = "float32"

    def __init__(
        self,
        model: nn.Module,
        data: DatasetConfig,
        class_names: list[str],
        model_config: dict[str, Any],
        *,
        device: torch.device | str = "cpu",
        pixel_mean: list[float] | None = None,
        pixel_std: list[float] | None = None,
    ) -> None:
        self.model = model
        self.data = data
        self.model_config = model_config
        self.device = torch.device(device)
        self.model.eval().to(self.device)
        geometry = ClipGeometry.of_dataset(data, class_names=class_names)
        if pixel_mean is not None and pixel_std is not None:
            geometry = dataclasses.replace(geometry, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.mean, self.std = geometry.normalisation(self.backbone, self.device)
        self.pixel_mean, self.pixel_std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        self.geometry = dataclasses.replace(geometry, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std)

    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The image backbone (its pretrained_cfg normalisation is the default input normalisation)."""

    @abstractmethod
    def scores(self, x: torch.Tensor, clips: int) -> np.ndarray:
        """Normalised views (clips*V, T, 3, H, W), clip-major -> class probabilities (clips, C)."""

    @property
    def class_names(self) -> list[str]:
        return list(self.geometry.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.geometry.class_names)

    @property
    def num_views(self) -> int:
        return self.geometry.num_views

    @torch.inference_mode()
    def forward(self, video: torch.Tensor) -> np.ndarray:
        """uint8 views (B, V, T, 3, H, W) -> class probabilities (B, C), softmax averaged over the V views."""
        on_cuda = self.device.type == "cuda"
        x = normalise_video(video.to(self.device, non_blocking=on_cuda).flatten(0, 1), self.mean, self.std)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            return self.scores(x, video.shape[0])

    __call__ = forward


class HeadsPredictor(Predictor):
    """A ``train-heads`` run: the feature model (stage 1 in memory), then the run's heads on its features.

    Args (besides ``Predictor``'s):
        heads: the trained averaging classifier.
        heads_info: its shape (which adapters and flow blocks it reads).
        feature_dtype: the cache dtype the heads were trained on (features are rounded through it).
    """

    kind = "heads"

    def __init__(
        self,
        model: FeatureExtractor,
        data: DatasetConfig,
        class_names: list[str],
        model_config: dict[str, Any],
        *,
        heads: AveragingClassifier,
        heads_info: HeadsInfo,
        feature_dtype: str = "float32",
        **common: Any,
    ) -> None:
        super().__init__(model, data, class_names, model_config, **common)
        self.heads = heads.eval().to(self.device)
        self.heads_info = heads_info
        self.feature_dtype = feature_dtype

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def scores(self, x: torch.Tensor, clips: int) -> np.ndarray:
        B, V = clips, x.shape[0] // clips
        f = self.model.extract(x)
        dtype = getattr(torch, self.feature_dtype)

        def cached(t: torch.Tensor, v: int) -> torch.Tensor:
            """View ``v`` of every clip, rounded through the cache's dtype as stage 2 read it."""
            return t.float().unflatten(0, (B, V))[:, v].to(dtype).float().cpu()

        # as the store keeps the maps; none for a feature type without them (ZeroI2V)
        flow = pack_block_maps(f.flow) if f.flow is not None else None
        views = [
            ClipFeatures(
                cached(f.embeddings, v), cached(f.cls, v), cached(flow, v) if flow is not None else None
            )
            for v in range(V)
        ]
        layout = self.model.layout()
        data = CachedFeatures.from_clip_features(
            views,
            np.zeros(B, dtype=np.int64),
            self.num_classes,
            layout.adapter_names,
            layout.flow_block_names,
            flow_geometry=layout.flow_geometry,
        )
        data = select_for_heads(data, self.heads_info)
        return predict_proba(self.heads, data, batch_size=max(B, 1), device=self.device)


class ClassifierPredictor(Predictor):
    """A video classifier (normalised views -> logits): its softmax averaged over the views."""

    @property
    def backbone(self) -> nn.Module:
        return self.model.vit

    def scores(self, x: torch.Tensor, clips: int) -> np.ndarray:
        logits = self.model(x).float()
        return logits.softmax(dim=-1).double().reshape(clips, -1, logits.shape[-1]).mean(dim=1).cpu().numpy()


class FinetunePredictor(ClassifierPredictor):
    """An end-to-end finetuning run (AM flow or ZeroI2V)."""

    kind = "finetune"


class MergedPredictor(ClassifierPredictor):
    """A merged ZeroI2V model (``amflow merge``): a plain ViT with STDHA and its classifier."""

    kind = "merged"


# An export's recorded kind -> the predictor class that loads it back.
PREDICTORS: dict[str, type[Predictor]] = {
    p.kind: p for p in (HeadsPredictor, FinetunePredictor, MergedPredictor)
}


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
    data = build_config(DatasetConfig, data_dict, f"{record_path} (dataset config)")
    data = ClipGeometry.resolve(data, model_cfg, f"{record_path} (model config)").with_crop(data)
    heads, info = load_heads(run)
    dev = resolve_device(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        model = load_extraction_model(model_cfg, checkpoint, torch.device("cpu"))
    names = class_labels(info.class_names or features.get("classes"), info.num_classes)
    return HeadsPredictor(
        model,
        data,
        names,
        config_to_dict(model.config),  # with a merged backbone's head offsets
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
    data = build_config(DatasetConfig, resolved["data"], f"{run / CONFIG_FILE} (data)")
    data = ClipGeometry.resolve(data, model_cfg, f"{ckpt} (metadata 'config')").with_crop(data)
    names = read_class_names(read_metadata(ckpt), ckpt, model_cfg.num_classes)
    return FinetunePredictor(
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
    return MergedPredictor(
        model,
        ClipGeometry.resolve(data, cfg, f"{path} (metadata 'config')").with_crop(data),
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
    from stage2_temporal.inference.export import EXPORT_FORMAT, load_export

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
    dataset = VideoClipDataset(records, None, predictor.geometry)
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
                probs = predictor(batch["video"])
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

    from foundation.atomic import atomic_path

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

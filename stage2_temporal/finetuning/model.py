"""The model side of finetuning: building the trainable model, gradient checkpointing, mixed precision,
and scoring clips with their test views (sharded over the ranks)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from foundation.config import ConfigError
from stage1_extract.families import family_of
from stage1_extract.families.backbone import RANDOM_INIT_WARNING, normalise_video, pixel_stats
from stage1_extract.videos.bucket import worker_start_method
from stage1_extract.videos.video import VideoClipDataset, collate_clips
from stage2_temporal.finetuning.distributed import Distributed
from stage2_temporal.finetuning.models import AMFlowModel, ModelConfig, build_model
from stage2_temporal.zeroi2v.model import ZeroI2VModel

FinetunableModel = AMFlowModel | ZeroI2VModel


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision in ``dtype`` on ``device``; ``None`` = full precision."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def use_gradient_checkpointing(model: FinetunableModel) -> int:
    """Recomputes each transformer block in the backward pass instead of keeping its activations.

    timm's ``set_grad_checkpointing``: both models' block loops then run each block under
    ``torch.utils.checkpoint`` while gradients are on. Returns the number of blocks checkpointed.
    """
    model.vit.set_grad_checkpointing(True)
    return len(family_of(model.vit).blocks(model.vit))


def build_finetune_model(cfg: ModelConfig) -> FinetunableModel:
    """The model of ``cfg``: frozen backbone, trainable adapters (and aligners) and classifier."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        model = build_model(cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameter")
    return model


def checkpoint_config(model: FinetunableModel, cfg: ModelConfig) -> ModelConfig:
    """The config stored with a checkpoint: ZeroI2V's resolved one (explicit head offsets) or ``cfg``."""
    return getattr(model, "config", cfg)


def evaluate_clips(
    model: FinetunableModel,
    dataset: VideoClipDataset,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    dist_: Distributed,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities averaged over each clip's test views, (clips, C) float64, and a decoded mask.

    Each rank scores clips ``rank::world``; the result is summed over ranks, so every rank gets all of it.
    """
    n = len(dataset)
    probs = torch.zeros(n, num_classes, dtype=torch.float64)
    decoded = torch.zeros(n, dtype=torch.float64)
    mine = list(range(dist_.rank, n, dist_.world_size))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_clips,
        pin_memory=device.type == "cuda",
        multiprocessing_context=worker_start_method(dataset.root, num_workers),
    )
    mean, std = pixel_stats(model.vit, device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(loader, desc="validate", unit="batch", disable=not progress, leave=False):
            if batch["video"] is None:
                continue
            video = batch["video"].to(device, non_blocking=True)
            B, V = video.shape[:2]
            with autocast(device, autocast_dtype):
                logits = model(normalise_video(video.flatten(0, 1), mean, std))
            p = logits.float().softmax(dim=-1).double().reshape(B, V, -1).mean(dim=1).cpu()
            probs[batch["index"]] = p
            decoded[batch["index"]] = 1.0
    model.train(was_training)
    dist_.sum(probs)
    dist_.sum(decoded)
    return probs.numpy(), decoded.numpy().astype(bool)

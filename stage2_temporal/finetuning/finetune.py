"""End-to-end finetuning from videos: adapters, aligning encoders and heads of the AM-flow model, or the
linear adapters and head of ZeroI2V, trained together on the frozen backbone (papers 000 and 002).

One process or ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on CUDA). Everything random is a
function of numbers, never of process history, so a killed run resumes to the same weights:

- clip order of epoch e: a permutation seeded by (seed, e); optimiser step s of the epoch takes clips
  ``[s*G, (s+1)*G)`` of it (G = global batch; the last incomplete batch is dropped), split into
  ``world_size x accumulation`` micro-batches, each rank decoding only its own;
- clip sampling and augmentation of clip i in epoch e: seeded by (seed, e, i) (``VideoClipDataset`` and
  ``AugmentedClips``), whatever the rank or DataLoader worker;
- dropout and other torch randomness of step s: the global RNG is re-seeded by (seed, e, s, rank) before
  the step, so the resume state needs no RNG state; the learning rate is a function of the step.

Modules: ``finetune_plan`` (recipe and configs), ``distributed`` (torchrun set-up, each rank's
micro-batches), ``finetune_state`` (the typed resume state and RUN_DIR's files), ``finetune_model``
(model, gradient checkpointing, validation forward); this module runs the loop.

RUN_DIR holds ``config.yaml`` (the resolved model, dataset and recipe configs), ``last.safetensors`` and
``best.safetensors`` (trainable parameters + config, ``stage1_extract.methods.checkpoint``), ``resume.pt``
(``FinetuneState`` and the optimiser; loads with ``torch.load(weights_only=True)``), ``steps.csv``
(loss and lr per optimiser step), ``curve.csv/png`` (per epoch), ``confusion_val.csv/png`` and, written
last, ``metrics.json``: its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from foundation.atomic import write_text_atomic
from foundation.config import ConfigError, config_to_dict
from stage1_extract.families.backbone import normalise_video
from stage1_extract.methods.checkpoint import (
    CheckpointError,
    check_backbone_weights,
    load_into,
    load_trainable_checkpoint,
    read_metadata,
    save_trainable_checkpoint,
)
from stage1_extract.videos.bucket import worker_start_method
from stage1_extract.videos.video import VideoClipDataset, collate_clips
from stage2_temporal.finetuning.augment import AugmentedClips, derived_seed
from stage2_temporal.finetuning.distributed import Distributed, StepBatches, epoch_order, init_distributed
from stage2_temporal.finetuning.model import (
    autocast,
    build_finetune_model,
    checkpoint_config,
    evaluate_clips,
    use_gradient_checkpointing,
)
from stage2_temporal.finetuning.plan import DEFAULT_RECIPE, FinetunePlan, plan_finetune
from stage2_temporal.finetuning.state import (
    BEST_FILE,
    LAST_FILE,
    RESUME_FILE,
    RUN_FILES,
    STEPS_FILE,
    FinetuneState,
    load_resume_state,
    prepare_run_dir,
    read_steps,
    regroup_optimizer_state,
    save_resume_state,
    write_steps,
)
from stage2_temporal.training.checks import check_out_dir
from stage2_temporal.training.metrics import write_confusion
from stage2_temporal.training.optim import adamw
from stage2_temporal.training.run_dir import CONFIG_FILE, METRICS_FILE, write_curve, write_json_atomic
from stage2_temporal.training.schedule import WarmupCosine, cosine_with_warmup
from stage2_temporal.training.tensorboard import EpochLogger
from stage2_temporal.training.train import score

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What a call did: run dir, whether it finished, steps done, metrics (finished runs), rank 0 or not."""

    run_dir: Path
    finished: bool
    global_step: int
    metrics: dict[str, Any] | None = None
    is_main: bool = True


def finetune(
    plan: FinetunePlan,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    progress: bool = True,
    tensorboard: bool = True,
) -> FinetuneResult:
    """Trains ``plan``'s model end to end, validating every epoch; writes RUN_DIR (rank 0 only).

    ``stop_after_steps`` stops before optimiser step N+1 (the schedule is unchanged), writing the resume
    state as a killed run would have at a save point; ``resume`` continues it. Under torchrun the
    ranks train one DistributedDataParallel model.
    """
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ValueError(f"stop_after_steps: expected >= 1, got {stop_after_steps}")
    dist_, device = init_distributed(plan.recipe.device)
    try:
        run = FinetuneRun(plan, Path(out_dir), dist_, device, progress and dist_.is_main)
        run.start(resume, overwrite)
        with EpochLogger(out_dir, enabled=tensorboard and dist_.is_main, fresh=not resume) as run.board:
            return run.train(stop_after_steps)
    finally:
        if dist_.owns_group:
            dist.destroy_process_group()


class FinetuneRun:
    """One run's model, optimiser, schedule, data and resumable ``state`` (saved in resume.pt)."""

    def __init__(
        self, plan: FinetunePlan, out: Path, dist_: Distributed, device: torch.device, progress: bool
    ) -> None:
        ft = plan.recipe
        self.plan, self.out, self.dist, self.device, self.progress = plan, out, dist_, device, progress
        world = dist_.world_size
        self.micro = ft.micro_batch_size or ft.batch_size // world
        if self.micro < 1 or ft.batch_size % (self.micro * world):
            raise ConfigError(
                f"batch_size {ft.batch_size} is not a multiple of micro_batch_size {self.micro} x {world} "
                "processes"
            )
        self.accumulation = ft.batch_size // (self.micro * world)
        self.steps_per_epoch = len(plan.train.records) // ft.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {ft.batch_size} is larger than the {len(plan.train.records)} training clips"
            )
        self.model = build_finetune_model(plan.model)
        self.checkpoint_cfg = checkpoint_config(self.model, plan.model)
        if ft.aligner_loss_weight:
            self.model.track_alignment()
        if ft.gradient_checkpointing:
            use_gradient_checkpointing(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.model, ft.lr, ft.weight_decay)
        total = ft.epochs * self.steps_per_epoch
        warmup = round(ft.warmup_epochs * self.steps_per_epoch)
        self.schedule = WarmupCosine(self.optimizer, total, warmup)
        self.lr_factor = cosine_with_warmup(total, warmup)
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" and ft.precision == "bf16" else None
        fetch = {"max_video_mb": plan.data.max_video_mb}  # videos under an s3:// root
        clips = VideoClipDataset(
            plan.train.records, plan.root, plan.geometry, train=True, seed=ft.seed, **fetch
        )
        self.train_set = AugmentedClips(clips, ft.augment, seed=ft.seed)
        self.val_set = VideoClipDataset(plan.val.records, plan.root, plan.geometry, train=False, **fetch)
        self.state = FinetuneState()
        self.step_rows: list[dict[str, Any]] = []
        self.board = EpochLogger(out, enabled=False)  # TensorBoard scalars per epoch (set by ``finetune``)

    def start(self, resume: bool, overwrite: bool) -> None:
        """Checks RUN_DIR, then writes config.yaml (new run) or loads the last save point (``resume``)."""
        out = self.out
        prepare_run_dir(out, self.plan, resume, overwrite)
        self.dist.barrier()  # every rank has checked RUN_DIR before rank 0 writes into it
        if self.dist.is_main and not resume:
            out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(self.plan.resolved(), sort_keys=False))
        if not resume and self.plan.recipe.init_checkpoint:
            init = self.plan.recipe.init_checkpoint
            weights, _ = load_trainable_checkpoint(init)
            check_backbone_weights(init, config_to_dict(self.plan.model))
            load_into(self.model, weights, init)
        if resume:
            state, optimizer = load_resume_state(out / RESUME_FILE)
            saved_step = read_metadata(out / LAST_FILE).get("global_step")
            if saved_step != str(state.global_step):
                raise CheckpointError(
                    f"{out / LAST_FILE}: holds step {saved_step}, {RESUME_FILE} step {state.global_step}"
                )
            weights, _ = load_trainable_checkpoint(out / LAST_FILE)
            load_into(self.model, weights, out / LAST_FILE)
            self.optimizer.load_state_dict(regroup_optimizer_state(optimizer, self.optimizer, self.params))
            self.state = state
            self.step_rows = read_steps(out / STEPS_FILE, state.global_step)
            if self.dist.is_main:
                log.info("resuming %s after step %d (epoch %d)", out, state.global_step, state.epoch + 1)
        self.model.to(self.device)
        self.mean, self.std = self.plan.geometry.normalisation(self.model.vit, self.device)
        self.trained = self.model
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def train(self, stop_after_steps: int | None = None) -> FinetuneResult:
        """Epochs from the current state to the end (or to ``stop_after_steps``), then the final files."""
        state, ft = self.state, self.plan.recipe
        clock, seconds_before = time.perf_counter(), self.state.seconds
        while self.state.epoch < ft.epochs:
            epoch_start = time.perf_counter()
            stopped = not self.train_epoch(stop_after_steps)
            self.state.seconds = seconds_before + time.perf_counter() - clock
            if stopped:
                self.save_point()
                return FinetuneResult(self.out, False, self.state.global_step, is_main=self.dist.is_main)
            self.validate(time.perf_counter() - epoch_start)
            self.state.seconds = seconds_before + time.perf_counter() - clock
            self.save_point()
        state = self.state
        metrics = self.final_metrics()
        if self.dist.is_main:
            write_curve(state.curve, self.out)
            write_confusion(
                state.best_metrics["confusion"], self.out / "confusion_val", self.plan.train.classes
            )
            write_json_atomic(metrics, self.out / METRICS_FILE)
        self.dist.barrier()
        return FinetuneResult(self.out, True, state.global_step, metrics, self.dist.is_main)

    def train_epoch(self, stop_after_steps: int | None) -> bool:
        """The remaining optimiser steps of the current epoch; False when stopped by ``stop_after_steps``."""
        state, ft = self.state, self.plan.recipe
        epoch, start = state.epoch, state.step_in_epoch
        self.train_set.set_epoch(epoch)
        order = epoch_order(len(self.train_set), ft.seed, epoch)
        batches = StepBatches(order, start, self.steps_per_epoch, self.micro, self.accumulation, self.dist)
        loader = DataLoader(
            self.train_set,
            batch_sampler=batches,
            num_workers=ft.num_workers,
            collate_fn=collate_clips,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context=worker_start_method(self.plan.root, ft.num_workers),
        )
        micro_batches = iter(loader)
        self.trained.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{ft.epochs}",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        with bar:
            for step in range(start, self.steps_per_epoch):
                if stop_after_steps is not None and state.global_step >= stop_after_steps:
                    return False
                step_start = time.perf_counter()
                lr = self.schedule.set_step(state.global_step)
                torch.manual_seed(derived_seed(ft.seed, epoch, step, self.dist.rank))
                sums = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, clips, failed clips
                for a in range(self.accumulation):
                    last = a == self.accumulation - 1
                    sync = (
                        contextlib.nullcontext()
                        if last or self.dist.world_size == 1
                        else self.trained.no_sync()
                    )
                    with sync:
                        sums += self.micro_step(next(micro_batches))
                if ft.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, ft.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.dist.sum(sums)
                state.global_step += 1
                state.step_in_epoch = step + 1
                state.epoch_loss_sum += float(sums[0])
                state.epoch_correct += float(sums[1])
                state.epoch_clips += float(sums[2])
                state.failed_train_clips += int(sums[3])
                state.train_seconds += time.perf_counter() - step_start
                loss = float(sums[0] / max(float(sums[2]), 1.0))
                self.step_rows.append({"step": state.global_step, "epoch": epoch + 1, "lr": lr, "loss": loss})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                if ft.save_every_steps and state.global_step % ft.save_every_steps == 0:
                    self.save_point()
        return True

    def micro_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns (loss sum, correct, clips, failed clips).

        The loss is the summed cross-entropy over this rank's clips of the step (DDP averages over the
        ranks), so the step's gradient is that of the mean loss over the global batch. A micro-batch whose
        clips all failed to decode still runs (a zero clip, weight 0): every rank joins the gradient exchange.
        """
        plan = self.plan
        failed = len(batch["failed"])
        if failed:
            log.warning(
                "%d training clips failed to decode: %s", failed, [f["path"] for f in batch["failed"]]
            )
        video, labels, weight = batch["video"], batch["label"], 1.0
        if video is None:
            T, S = plan.geometry.num_frames, plan.geometry.crop_size
            video, labels, weight = (
                torch.zeros(1, 1, T, 3, S, S, dtype=torch.uint8),
                torch.zeros(1).long(),
                0.0,
            )
        video = video.to(self.device, non_blocking=True).squeeze(1)  # training items hold one view
        labels = labels.to(self.device)
        with autocast(self.device, self.autocast_dtype):
            logits = self.trained(normalise_video(video, self.mean, self.std))
        loss = F.cross_entropy(
            logits.float(), labels, label_smoothing=plan.recipe.label_smoothing, reduction="sum"
        )
        if plan.recipe.aligner_loss_weight:  # our addition; per clip, as the summed cross-entropy
            loss = loss + plan.recipe.aligner_loss_weight * len(labels) * self.model.alignment_loss().float()
        (loss * (weight / (self.micro * self.accumulation))).backward()
        correct = float((logits.argmax(dim=-1) == labels).sum()) * weight
        return torch.tensor(
            [loss.item() * weight, correct, len(labels) * weight, failed], dtype=torch.float64
        )

    def validate(self, train_seconds: float) -> None:
        """Scores the validation split, appends the epoch's curve row, saves ``best`` when it improved."""
        state, plan = self.state, self.plan
        epoch = state.epoch
        clock = time.perf_counter()
        probs, decoded = evaluate_clips(
            self.model,
            self.val_set,
            plan.train.num_classes,
            plan.recipe.eval_batch_size,
            self.device,
            self.autocast_dtype,
            self.dist,
            plan.recipe.num_workers,
            self.progress,
        )
        if not decoded.any():
            raise RuntimeError(f"validation split {plan.val.split!r}: no clip could be decoded")
        labels = np.array([r.label for r in plan.val.records])
        val = score(probs[decoded], labels[decoded], plan.train.num_classes)
        val["failed_clips"] = int((~decoded).sum())
        clips = max(state.epoch_clips, 1.0)
        row = {
            "epoch": epoch + 1,
            "lr": plan.recipe.lr * self.lr_factor(epoch * self.steps_per_epoch),
            "train_loss": state.epoch_loss_sum / clips,
            "train_top1": state.epoch_correct / clips,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_mean_class_acc": val["mean_class_acc"],
            "seconds": train_seconds + time.perf_counter() - clock,
        }
        state.curve.append(row)
        self.board.log(row, epoch + 1)
        state.start_epoch()
        if row["val_mean_class_acc"] > state.best_score:
            state.best_score, state.best_epoch, state.best_metrics = row["val_mean_class_acc"], epoch + 1, val
            if self.dist.is_main:
                self.save_checkpoint(BEST_FILE, {"val_mean_class_acc": f"{val['mean_class_acc']:.6f}"})
        if self.progress:
            tqdm.write(
                f"epoch {epoch + 1}/{plan.recipe.epochs}: train loss {row['train_loss']:.4f}, val top-1 "
                f"{100 * row['val_top1']:.2f}%, mean class acc {100 * row['val_mean_class_acc']:.2f}%"
            )

    def save_checkpoint(self, name: str, extra: dict[str, str] | None = None) -> None:
        """Trainable parameters + resolved model config, with the step and epoch in the metadata."""
        meta = {
            "global_step": str(self.state.global_step),
            "epoch": str(self.state.epoch),
            **(extra or {}),
        }
        meta["class_names"] = json.dumps(self.plan.train.classes)
        save_trainable_checkpoint(self.model, self.checkpoint_cfg, self.out / name, meta)

    def save_point(self) -> None:
        """last.safetensors, steps.csv, then resume.pt (the commit): a run resumes from the last commit."""
        if self.dist.is_main:
            self.save_checkpoint(LAST_FILE)
            write_steps(self.step_rows, self.out / STEPS_FILE)
            save_resume_state(self.state, self.optimizer.state_dict(), self.out / RESUME_FILE)
        self.dist.barrier()

    def final_metrics(self) -> dict[str, Any]:
        """metrics.json: the best epoch's validation metrics and the run's facts."""
        state, plan = self.state, self.plan
        clips_trained = state.global_step * plan.recipe.batch_size
        return {
            "val": {k: v for k, v in state.best_metrics.items() if k != "confusion"},
            "val_split": plan.val.split,
            "best_epoch": state.best_epoch,
            "epochs_run": len(state.curve),
            "global_steps": state.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "final_train_loss": state.curve[-1]["train_loss"],
            "seconds": state.seconds,
            "train_clips_per_second": clips_trained / state.train_seconds if state.train_seconds else 0.0,
            "trainable_parameters": sum(p.numel() for p in self.params),
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_kind": plan.model.kind,
            "world_size": self.dist.world_size,
            "global_batch": plan.recipe.batch_size,
            "micro_batch": self.micro,
            "accumulation": self.accumulation,
            "num_train_clips": len(plan.train.records),
            "num_val_clips": len(plan.val.records),
            "failed_train_clips": state.failed_train_clips,
            "class_names": plan.train.classes,
            "device": str(self.device),
            "seed": plan.recipe.seed,
            "best_checkpoint": BEST_FILE,
        }


def finetune_from_args(
    dataset: str,
    root: str | Path,
    model_config: str | Path,
    out_dir: str | Path,
    *,
    protocol: str | None = None,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    progress: bool = True,
    tensorboard: bool = True,
) -> FinetuneResult:
    """``plan_finetune`` then ``finetune``: what ``amflow finetune`` runs."""
    check_out_dir(out_dir)
    plan = plan_finetune(
        dataset, root, model_config, protocol=protocol, recipe=recipe or DEFAULT_RECIPE, overrides=overrides
    )
    return finetune(
        plan,
        out_dir,
        resume=resume,
        overwrite=overwrite,
        stop_after_steps=stop_after_steps,
        progress=progress,
        tensorboard=tensorboard,
    )

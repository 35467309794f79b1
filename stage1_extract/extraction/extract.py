"""Stage 1: decode a dataset's videos, run the frozen backbone with adapters, write the feature store.

One plan (``ExtractionPlan``) describes a run completely and is picklable, so the same function
(``extract_shards``) runs in this process or in dask.distributed workers; each call owns whole shards,
batches clips in shard order (the same batches whatever the number of workers, so results are
identical), records undecodable videos as failures and commits per shard. A finished store is left as
it is; an interrupted one resumes with only its missing clips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from foundation.config import ConfigError, config_to_dict, route_overrides
from foundation.devices import resolve_device
from foundation.files import file_sha256
from stage1_extract.extraction.block_maps import pack_block_maps
from stage1_extract.families.backbone import RANDOM_INIT_WARNING, normalise_video
from stage1_extract.features import FeatureExtractor, build_feature_extractor, feature_type_name
from stage1_extract.methods.models import feature_config_class, feature_config_from_dict, load_feature_config
from stage1_extract.videos.bucket import VideoBytes, clip_source, worker_start_method
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import (
    DEFAULT_MAX_VIDEO_MB,
    ClipRecord,
    DatasetConfig,
    build_index,
    load_dataset_config,
)
from stage1_extract.videos.decode_plan import resolve_decode_device
from stage1_extract.videos.video import VideoClipDataset, collate_clips
from store.feature_store import STATUS_MISSING, FeatureStore, NonFiniteFeaturesError, StoreError
from store.objects import is_url
from store.repair import damage_summary, find_damage
from store.writer import BackgroundCommits, ShardWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ExtractOptions:
    """How to run an extraction (none of these change the features, except ``dtype``)."""

    batch_size: int = 8
    decode_workers: int = 2
    device: str = "auto"
    store_flow: bool = False  # AM-flow maps (clips, blocks, views, T, heads, N): large for ViT-B
    dtype: str = "float16"
    shard_clips: int | None = None
    compression: str = "none"
    commit_every: int | None = None
    threads: int | None = None  # torch CPU threads; None = the cores left beside the decoding workers
    decode_device: str = "cpu"  # cuda: NVDEC through PyAV where it works, else the CPU with a warning
    decode_threads: int = 1  # FFmpeg threads per decoding worker
    compile: bool = False  # torch.compile the model's extraction forward
    train_views: int = 0  # K > 0: K augmented training views per clip instead of the test views
    train_flip: float = 0.0  # probability of a horizontal flip of a training view
    train_views_seed: int = 0
    dashboard: bool = False  # serve the dask dashboard of a local cluster (workers > 1)

    def validate(self) -> None:
        """One-line errors for impossible settings, before any store is created."""
        checks = {
            "--batch-size": (self.batch_size, 1),
            "--decode-workers": (self.decode_workers, 0),
            "--shard-clips": (self.shard_clips, 1),
            "commit_every": (self.commit_every, 1),
            "threads": (self.threads, 1),
        }
        for arg, (value, low) in checks.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{arg}: expected an integer >= {low}, got {value!r}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"--dtype: expected float16 or float32, got {self.dtype!r}")
        resolve_device(self.device)
        if self.train_views < 0 or not 0 <= self.train_flip <= 1:
            raise ValueError(
                f"--train-views {self.train_views} / --train-flip {self.train_flip}: expected K >= 0 "
                "(0 = test-time views) and a flip probability in [0, 1]"
            )


@dataclasses.dataclass
class ExtractionPlan:
    """Everything a worker needs to extract shards of one store (picklable)."""

    store_path: str
    root: str
    model_config: dict[str, Any]
    dataset_config: dict[str, Any]
    records: list[tuple[str, int, int | None, int | None]]
    checkpoint: str | None
    options: ExtractOptions
    geometry: ClipGeometry


@dataclasses.dataclass
class ExtractSummary:
    """What a run did: clip counts, wall time and throughput."""

    store: str
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    processed: int = 0
    seconds: float = 0.0
    already_complete: bool = False

    @property
    def clips_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        """A short summary table for the end of a run."""
        rows = [
            ("clips in split", self.total),
            ("done (in store)", self.done),
            ("failed (recorded)", self.failed),
            ("skipped (already done)", self.skipped),
            ("processed this run", self.processed),
            ("wall time", f"{self.seconds:.1f} s"),
            ("throughput", f"{self.clips_per_second:.2f} clips/s"),
        ]
        return "\n".join(f"  {k:<24}{v}" for k, v in rows)


def load_extraction_model(cfg: Any, checkpoint: str | None, device: torch.device) -> FeatureExtractor:
    """The feature model of ``cfg`` (its registered type, ``stage1_extract.features``) in inference mode on
    ``device``, with ``checkpoint``'s weights (trained adapters, a merged ZeroI2V backbone) if given."""
    return build_feature_extractor(cfg, checkpoint).to(device)


def feature_fingerprint(
    model_cfg: Any, data_cfg: DatasetConfig, checkpoint: str | None, dtype: str, store_flow: bool
) -> dict[str, Any]:
    """Everything that changes the cached features (not the split: train/val/test stores must agree)."""
    model = config_to_dict(model_cfg)
    for key in ("heads", "num_classes"):  # stage 2's keys, recorded in stores made before they moved
        model.pop(key, None)
    weights = model["backbone"].pop("weights")
    data = config_to_dict(data_cfg)
    for key in ("video_dir", "annotation_dir", "annotations", "train_crop", "max_video_mb"):
        data.pop(key, None)
    return {
        "model": model,
        "data": data,
        "weights_sha256": file_sha256(weights),
        "checkpoint_sha256": file_sha256(checkpoint),
        "dtype": dtype,
        "flow": store_flow,
    }


@functools.lru_cache(maxsize=2)
def _cached_model(
    model_json: str, checkpoint: str | None, device: str, compile: bool = False
) -> FeatureExtractor:
    """One model per worker process and plan (dask runs many shard tasks in one process)."""
    cfg = feature_config_from_dict(json.loads(model_json), "<extraction plan>")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        model = load_extraction_model(cfg, checkpoint, torch.device(device))
    if compile:  # the frozen forward only; a batch of another size compiles once more
        model.extract = torch.compile(model.extract, dynamic=False)
    return model


def _worker_device(requested: str) -> str:
    """The device for this process: in a dask worker with several GPUs, GPU (worker number mod count)."""
    device = resolve_device(requested)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
            return f"cuda:{int(name) % torch.cuda.device_count()}"
        except (ImportError, ValueError, TypeError):
            pass
    return str(device)


class ShardBatches(Sampler[list[int]]):
    """Batches of consecutive clips that never cross a shard boundary (the same in every run mode)."""

    def __init__(self, shard_of_clip: Sequence[int], batch_size: int) -> None:
        self.batches: list[list[int]] = []
        for i, shard in enumerate(shard_of_clip):
            last = self.batches[-1] if self.batches else None
            if last and shard_of_clip[last[0]] == shard and len(last) < batch_size:
                last.append(i)
            else:
                self.batches.append([i])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def extract_shards(
    plan: ExtractionPlan, shards: Sequence[int], progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Extracts the missing clips of ``shards`` into the store; returns counts of done and failed clips.

    One DataLoader decodes all of them (started before the model loads, so decoding overlaps it), in
    batches that stay inside a shard; each shard's writer commits when its last batch is written.
    """
    opts = plan.options
    device = _worker_device(opts.device)
    store = FeatureStore.open(plan.store_path, mode="r+")
    status = store.status()
    todo = [i for s in sorted(shards) for i in store.clips_in_shard(s) if status[i] == STATUS_MISSING]
    counts = {"done": 0, "failed": 0}
    if not todo:
        return counts
    threads = opts.threads or (
        max(1, (os.cpu_count() or 1) - opts.decode_workers) if opts.decode_workers else None
    )
    if device.startswith("cpu") and threads:
        torch.set_num_threads(threads)  # the model and the decoding workers share the cores
    records = [ClipRecord(*plan.records[i]) for i in todo]
    max_video_mb = plan.dataset_config.get("max_video_mb", DEFAULT_MAX_VIDEO_MB)
    sample = _first_video(plan.root, records, max_video_mb) if opts.decode_device == "cuda" else None
    decode_device = resolve_decode_device(opts.decode_device, sample)
    if opts.train_views:
        from stage1_extract.extraction.train_views import TrainViewsDataset

        dataset = TrainViewsDataset(
            records,
            todo,
            plan.root,
            plan.geometry,
            views=opts.train_views,
            flip=opts.train_flip,
            seed=opts.train_views_seed,
            max_video_mb=max_video_mb,
        )
    else:
        dataset = VideoClipDataset(
            records, plan.root, plan.geometry, train=False,
            decode_threads=opts.decode_threads, decode_device=decode_device, max_video_mb=max_video_mb,
        )  # fmt: skip
    on_cuda = device.startswith("cuda")
    sampler = ShardBatches([store.shard_of(i) for i in todo], opts.batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=opts.decode_workers,
        collate_fn=collate_clips,
        pin_memory=on_cuda,  # pinned batches: the copy to the GPU is asynchronous (non_blocking)
        # NVDEC in a forked child of a process holding a CUDA context is undefined: start workers fresh
        multiprocessing_context=(
            "spawn"
            if decode_device == "cuda" and opts.decode_workers
            else worker_start_method(plan.root, opts.decode_workers)
        ),
    )
    batches = iter(loader)  # decoding workers start now
    model_json = json.dumps(plan.model_config, sort_keys=True)
    model = _cached_model(model_json, plan.checkpoint, device, opts.compile)
    mean, std = plan.geometry.normalisation(model.backbone, device)
    writer: ShardWriter | None = None
    commits = BackgroundCommits()  # a finished shard is written to disk while the next one is computed
    try:
        for indices, batch in zip(sampler.batches, batches):  # in order: batch k is sampler.batches[k]
            shard = store.shard_of(todo[indices[0]])
            if writer is None or writer.shard != shard:
                if writer is not None:
                    commits.close(writer)
                    writer = None
                writer = store.shard_writer(shard, commit_every=opts.commit_every)
            for item in batch["failed"]:
                writer.fail(todo[item["index"]], item["error"][0], item["error"][1])
                counts["failed"] += 1
            if batch["video"] is not None:
                features = _forward(model, batch["video"], mean, std, device, on_cuda, opts.store_flow)
                for j, idx in enumerate(batch["index"].tolist()):
                    try:
                        writer.put(
                            todo[idx],
                            embeddings=features["embeddings"][j],
                            cls=features["cls"][j],
                            flow=features["flow"][j] if opts.store_flow else None,
                        )
                        counts["done"] += 1
                    except NonFiniteFeaturesError as e:  # e.g. a float16 overflow; other errors stop
                        writer.fail(todo[idx], "NonFiniteFeatures", str(e))
                        counts["failed"] += 1
            if progress is not None:
                progress(len(batch["index"]) + len(batch["failed"]))
        if writer is not None:
            commits.close(writer)
            writer = None
        commits.wait()
    except OSError as e:  # a full disk or a store gone read-only: finished shards are kept
        raise StoreError(
            f"{plan.store_path}: cannot write ({e.strerror or e}); shards committed so far are kept: free "
            "space and run the same command again to resume"
        ) from e
    finally:
        commits.shutdown()  # handed-over commits finish; a failed one was raised by close() or wait() above
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()  # commits what fits; the lock is released in any case
    return counts


def _first_video(root: str, records: Sequence[ClipRecord], max_video_mb: float) -> Path | VideoBytes | None:
    """The first of ``records``' videos that exists (fetched from a bucket root): NVDEC is tried on it."""
    for record in records:
        try:
            source = clip_source(root, record.path, int(max_video_mb * 2**20))
        except StoreError:  # the bucket itself failed
            raise
        except (OSError, ValueError):  # absent, refused or too large: try the next one
            continue
        if isinstance(source, VideoBytes) or source.is_file():
            return source
    return None


@torch.inference_mode()
def _forward(
    model: FeatureExtractor,
    video: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: str,
    on_cuda: bool,
    with_flow: bool = True,
) -> dict[str, np.ndarray | None]:
    """uint8 views (B, V, T, 3, H, W) -> float32 numpy features laid out as the store's arrays.

    ``with_flow=False`` leaves the AM-flow maps on the device (``"flow": None``): for ViT-B/14 AM/12 they
    are ~3.5 MB per clip, more than everything else a GPU sends back. Maps of one shape per block are
    (B, F, V, T, h, N); packed maps of blocks of different shapes (B, V, T, M), as the store keeps them.
    """
    B, V = video.shape[:2]
    x = normalise_video(video.to(device, non_blocking=on_cuda).flatten(0, 1), mean, std)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        f = model.extract(x)
    emb = f.embeddings.float().reshape(B, V, *f.embeddings.shape[1:]).transpose(1, 2)  # (B, A, V, T, r)
    cls = f.cls.float().reshape(B, V, -1)
    out = {"embeddings": emb.cpu().numpy(), "cls": cls.cpu().numpy(), "flow": None}
    if with_flow:
        packed = pack_block_maps(f.flow)
        flow = packed.float().reshape(B, V, *packed.shape[1:])
        if flow.ndim == 6:
            flow = flow.transpose(1, 2)  # (B, F, V, T, h, N)
        out["flow"] = flow.cpu().numpy()
    return out


def plan_extraction(
    dataset: str,
    root: str | Path,
    split: str,
    model_config: str | Path,
    out: str | Path,
    *,
    protocol: str | None = None,
    overrides: Sequence[str] = (),
    checkpoint: str | None = None,
    options: ExtractOptions | None = None,
) -> tuple[ExtractionPlan, FeatureStore]:
    """Reads the configs and the dataset's split, and creates (or re-opens for resuming) the store.

    ``overrides`` are routed by ``route_overrides``: ``data.KEY=V`` to the dataset config, ``model.KEY=V``
    to the model config, a bare key to the one that has it (``num_frames`` to both).
    """
    options = options or ExtractOptions()
    options.validate()
    if options.train_views and split != "train":
        raise ValueError(
            f"--train-views {options.train_views}: augmented training views are for the train split; "
            f"split {split!r} is scored with its test-time views (drop --train-views)"
        )
    routed = route_overrides(overrides, {"data": DatasetConfig, "model": feature_config_class(model_config)})
    data_over = routed["data"] + ([f"protocol={protocol}"] if protocol is not None else [])
    data_cfg = load_dataset_config(dataset, data_over)
    model_cfg = load_feature_config(model_config, routed["model"])
    geometry = ClipGeometry.resolve(data_cfg, model_cfg, str(model_config))
    data_cfg = geometry.with_crop(data_cfg)  # the dataset config a store records (and fingerprints)
    index = build_index(dataset, root, split, data_cfg)
    log.info(index.summary())
    if index.missing:
        log.warning("%d listed videos are missing; they are recorded as failures", len(index.missing))
    if index.refused:
        log.warning("%d listed paths leave the dataset root: recorded as failures", len(index.refused))
    records = sorted(index.records + index.missing + index.refused, key=lambda r: r.path)
    if not records:
        raise ConfigError(f"{dataset} split {split!r} under {root}: no clips found")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        meta = build_feature_extractor(model_cfg)
    geometry.check_model(meta.backbone, str(model_config))
    shapes = meta.layout()
    if options.store_flow and not shapes.flow_block_names:
        raise ConfigError(
            f"--flow: feature type {feature_type_name(model_cfg)!r} ({model_config}) has no AM-flow maps; "
            "drop --flow"
        )
    if checkpoint:  # a checkpoint that does not load or fit is refused before the store exists
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
            load_extraction_model(model_cfg, checkpoint, torch.device("meta"))
    views = options.train_views or data_cfg.num_clips * data_cfg.num_crops
    fingerprint = feature_fingerprint(model_cfg, data_cfg, checkpoint, options.dtype, options.store_flow)
    provenance = {
        "config": {"model": config_to_dict(model_cfg), "dataset": config_to_dict(data_cfg)},
        "backbone": model_cfg.backbone.name,
        "weights": model_cfg.backbone.weights,
        "weights_sha256": fingerprint["weights_sha256"],
        "checkpoint": checkpoint,
        "checkpoint_sha256": fingerprint["checkpoint_sha256"],
        "adapter_seed": model_cfg.seed,
        "dataset": dataset,
        "root": str(root) if is_url(root) else str(Path(root).resolve()),  # a URL as given, never a secret
        "protocol": data_cfg.protocol,
        "split": split,
        "sampling": {
            k: getattr(data_cfg, k)
            for k in ("sampling", "num_frames", "frame_interval", "num_clips", "num_crops", "train_crop")
        },
        # K > 0: the view axis holds K augmented training views (stage1_extract/extraction/train_views.py);
        # not in the fingerprint, so a training store with them is comparable with test-view validation stores
        "train_views": {
            "views": options.train_views,
            "flip": options.train_flip,
            "seed": options.train_views_seed,
        },
        "skipped": index.skipped,
        "maps": feature_type_name(model_cfg),  # the feature type (stage1_extract.features)
    }
    store = FeatureStore.create(
        out,
        clip_ids=[r.path for r in records],
        labels=[r.label for r in records],
        num_adapters=len(shapes.adapter_names),
        num_views=views,
        num_frames=data_cfg.num_frames,
        embed_dim=shapes.embed_dim,
        cls_dim=shapes.cls_dim,
        provenance=provenance,
        fingerprint_fields=fingerprint,
        flow_blocks=shapes.flow_geometry if options.store_flow else None,
        class_names=index.classes,
        dtype=options.dtype,
        shard_clips=options.shard_clips,
        compression=options.compression,
        adapter_names=shapes.adapter_names,
        flow_block_names=shapes.flow_block_names,
    )
    damage = find_damage(store)  # the cheap half of `store verify`: a damaged store is never "complete"
    if damage:
        raise StoreError(f"{out}: {damage_summary(store, damage)}")
    plan = ExtractionPlan(
        store_path=str(out),
        root=str(root),
        model_config=config_to_dict(model_cfg),
        dataset_config=config_to_dict(data_cfg),
        records=[(r.path, r.label, r.start_frame, r.end_frame) for r in records],
        checkpoint=checkpoint,
        options=options,
        geometry=dataclasses.replace(geometry, class_names=tuple(index.classes)),
    )
    return plan, store


def run_extraction(
    plan: ExtractionPlan, store: FeatureStore, workers: int = 1, scheduler: str | None = None
) -> ExtractSummary:
    """Extracts every pending shard, in this process or on dask.distributed; prints progress."""
    counts_before = store.counts()
    summary = ExtractSummary(store=plan.store_path, total=store.num_clips, skipped=counts_before["done"])
    pending = store.pending_shards()
    start = time.perf_counter()
    if not pending:
        summary.already_complete = True
        summary.done, summary.failed = counts_before["done"], counts_before["failed"]
        return summary
    todo = int(store.missing().size)
    with tqdm(total=todo, unit="clip", desc="extract", dynamic_ncols=True) as bar:
        if workers <= 1 and scheduler is None:
            extract_shards(plan, pending, progress=bar.update)
        else:
            _run_distributed(plan, store, pending, workers, scheduler, bar)
    summary.seconds = time.perf_counter() - start
    final = FeatureStore.open(plan.store_path).counts()
    summary.done, summary.failed = final["done"], final["failed"]
    summary.processed = (final["done"] + final["failed"]) - (counts_before["done"] + counts_before["failed"])
    return summary


def _run_distributed(
    plan: ExtractionPlan,
    store: FeatureStore,
    shards: list[int],
    workers: int,
    scheduler: str | None,
    bar: tqdm,
) -> None:
    """One dask task per shard; each worker process keeps its model between tasks."""
    from distributed import as_completed

    from foundation.cluster import client_for

    client, cluster = client_for(workers, scheduler, dashboard=plan.options.dashboard)
    try:
        with client:
            plan = dataclasses.replace(plan, options=dataclasses.replace(plan.options, decode_workers=0))
            plan_future = client.scatter(plan, broadcast=True)
            per_shard = np.bincount(store.missing() // store.shard_clips, minlength=store.num_shards)
            sizes = {s: int(per_shard[s]) for s in shards}
            futures = {client.submit(extract_shards, plan_future, [s], pure=False): s for s in shards}
            for future in as_completed(futures):
                future.result()
                bar.update(sizes[futures[future]])
    finally:
        if cluster is not None:
            cluster.close()

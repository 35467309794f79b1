"""Why the cache exists: training heads from cached features vs end-to-end, and how fast a sweep goes.

Side by side in one run, on the same clips and the same heads (the model config's ``heads``):
  1. seconds per epoch training the heads from the cache (stage 2, ``train_epoch``);
  2. seconds per epoch training the same heads end to end: every batch goes through the frozen backbone
     and its AM-flow adapters first (``model.extract`` without gradients, the cheapest end-to-end case;
     training the adapters too would add their backward), then the same step;
  3. their ratio (target >= 50x on CPU), and runs / heads trained per second in a small sweep;
  4. an LSTM-heads epoch at Smarthome size, scaled down (default 2,000 clips x 24 adapters x T=8 x r=768,
     paper heads: 3-layer LSTM 768 per adapter) and extrapolated linearly to the 16k clips of Smarthome.
     Paper-size heads are timed over a few steps and extrapolated (said so in the output).

    python benchmarks/sweep_speed.py                               # tiny random-init ViT, CPU
    python benchmarks/sweep_speed.py --model configs/models/amflow_vits14_dinov2_am12_lstm.yaml \
        --clips 32 model.backbone.img_size=112
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import stage1_extract  # noqa: F401  (before timm)
from stage1_extract.families.backbone import RANDOM_INIT_WARNING
from stage1_extract.features.am_flow import AMFlowFeatures
from stage2_temporal.finetuning.models import build_amflow, load_model_config
from stage2_temporal.heads import LSTMHeadsConfig
from stage2_temporal.sweeps.sweep import SweepGrid, run_sweep
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.data import CachedFeatures
from stage2_temporal.training.train import heads_info, make_optimiser, train_epoch


def cache_epoch_seconds(data: CachedFeatures, cfg: TrainConfig, epochs: int, max_steps: int | None = None):
    """Median seconds per (possibly partial) epoch from the cache, and the steps each epoch ran."""
    torch.manual_seed(cfg.seed)
    classifier = heads_info(data, cfg).build()
    steps = math.ceil(data.num_clips / cfg.batch_size)
    optimiser, schedule = make_optimiser(classifier, cfg, steps)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        train_epoch(classifier, data, optimiser, schedule, cfg, generator, max_steps=max_steps)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), min(steps, max_steps or steps), classifier


def end_to_end_epoch_seconds(model, videos: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> float:
    """Seconds of one epoch of the same heads trained end to end (backbone + adapters forward included)."""
    classifier = model.classifier
    steps = math.ceil(len(videos) / cfg.batch_size)
    optimiser, schedule = make_optimiser(classifier, cfg, steps)
    classifier.train()
    start = time.perf_counter()
    for i in range(0, len(videos), cfg.batch_size):
        with torch.no_grad():
            features = model.extract(videos[i : i + cfg.batch_size])
        loss = F.cross_entropy(classifier(features), labels[i : i + cfg.batch_size])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return time.perf_counter() - start


def random_cache(
    clips: int, adapters: int, frames: int, dim: int, classes: int, seed: int = 0
) -> CachedFeatures:
    """A float16 cache of random features (timing only), generated in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    embeddings = np.empty((clips, 1, adapters, frames, dim), dtype=np.float16)
    for i in range(0, clips, 256):
        chunk = embeddings[i : i + 256]
        chunk[...] = rng.standard_normal(chunk.shape, dtype=np.float32)
    return CachedFeatures(
        embeddings=embeddings,
        cls=rng.standard_normal((clips, 1, dim), dtype=np.float32).astype(np.float16),
        labels=rng.integers(0, classes, clips),
        num_classes=classes,
        adapter_names=[f"adapter{i}" for i in range(adapters)],
        source="<random>",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/models/amflow_tiny.yaml", help="model config (its heads)")
    p.add_argument("--clips", type=int, default=128, help="clips for the cache vs end-to-end comparison")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sweep-workers", type=int, default=2, help="dask workers for the sweep (0: in process)")
    p.add_argument("--smarthome-clips", type=int, default=2000, help="scaled-down Smarthome cache size")
    p.add_argument("--smarthome-steps", type=int, default=2, help="steps timed for paper-size LSTM heads")
    p.add_argument("--skip-smarthome", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
    p.add_argument("overrides", nargs="*", metavar="model.key=value", help="model config overrides")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    # ---- 1-3: cache vs end to end, same clips, same heads ---------------------------------------------
    overrides = [o.removeprefix("model.") for o in args.overrides]
    model_cfg = load_model_config(args.model, overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        model = build_amflow(model_cfg).eval()
    size = model_cfg.backbone.img_size or 224
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(args.clips, model_cfg.num_frames, 3, size, size, generator=g)
    labels = torch.randint(model_cfg.num_classes, (args.clips,), generator=g)
    cfg = TrainConfig(heads=model_cfg.heads, batch_size=args.batch_size, epochs=10, warmup_epochs=1)

    start = time.perf_counter()
    with torch.no_grad():
        views = [
            model.extract(videos[i : i + args.batch_size]) for i in range(0, args.clips, args.batch_size)
        ]
    extract_seconds = time.perf_counter() - start
    features = type(views[0])(
        *(torch.cat([getattr(v, k) for v in views]) for k in ("embeddings", "cls", "flow"))
    )
    cache = CachedFeatures.from_clip_features(
        features,
        labels,
        num_classes=model_cfg.num_classes,
        adapter_names=model.adapter_names,
        flow_block_names=model.flow_block_names,
        flow_geometry=AMFlowFeatures.layout_of(model).flow_geometry,
    )
    half = {k: getattr(cache, k).astype(np.float16) for k in ("embeddings", "cls", "flow")}
    cache = dataclasses.replace(cache, **half)  # as stage 1 stores them
    cached, _, classifier = cache_epoch_seconds(cache, cfg, epochs=5)
    e2e = end_to_end_epoch_seconds(model, videos, labels, cfg)
    heads = classifier.num_branches
    print(
        f"\n== {args.model}: {args.clips} clips x {model_cfg.num_frames} frames at {size} px, "
        f"{len(model.adapter_names)} adapters, {len(model.flow_block_names)} flow blocks, "
        f"{heads} branches ({model_cfg.heads.type}, hidden {model_cfg.heads.hidden}, "
        f"flow maps {'on' if model_cfg.heads.flow_maps else 'off'})"
    )
    print(f"{'one-off stage-1 extraction':<44}{extract_seconds:>10.3f} s")
    print(f"{'epoch from the cache (s)':<44}{cached:>10.3f} s")
    print(f"{'epoch end to end, backbone forward incl. (s)':<44}{e2e:>10.3f} s")
    print(f"{'ratio end to end / cache':<44}{e2e / cached:>10.1f} x   (target >= 50x)")

    # ---- sweep throughput ---------------------------------------------------------------------------
    grid = SweepGrid(
        base="heads/tiny.yaml",
        fixed={"epochs": 5, "patience": None, "batch_size": args.batch_size},
        grid={"heads.type": ["lstm", "tcn"], "lr": [3e-3, 1e-3], "heads.flow_maps": [True, False]},
    )
    for workers in sorted({0, args.sweep_workers}):
        tmp = tempfile.mkdtemp(prefix="sweep_speed_")
        try:
            result = run_sweep(cache, cache, grid, tmp, workers=workers, progress=False)
            heads_trained = sum(
                json.loads(m.read_text())["num_branches"] for m in Path(tmp).glob("runs/*/metrics.json")
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        where = "in this process" if workers == 0 else f"{workers} dask workers, cluster start-up included"
        print(f"\n== sweep: {result.runs} runs x 5 epochs on these {args.clips} clips, {where}")
        print(f"{'wall time':<44}{result.seconds:>10.2f} s")
        print(f"{'runs trained per second':<44}{result.trained / result.seconds:>10.2f}")
        print(f"{'heads (branches) trained per second':<44}{heads_trained / result.seconds:>10.1f}")

    if args.skip_smarthome:
        return
    # ---- Smarthome size, scaled down ------------------------------------------------------------------
    n = args.smarthome_clips
    data = random_cache(n, adapters=24, frames=8, dim=768, classes=31)
    print(
        f"\n== Smarthome-size LSTM heads, {n} clips x 24 adapters x T=8 x r=768 (float16 in memory, "
        f"{data.embeddings.nbytes / 2**30:.2f} GiB), batch 64; x{16115 / n:.2f} for the 16,115 clips"
    )
    for name, heads_cfg, steps in (
        ("small: LSTM 128, 1 layer", LSTMHeadsConfig(hidden=128, layers=1), None),
        ("paper: LSTM 768, 3 layers", LSTMHeadsConfig(hidden=768, layers=3), args.smarthome_steps),
    ):
        cfg = TrainConfig(heads=heads_cfg, batch_size=64, epochs=1, warmup_epochs=0)
        seconds, ran, classifier = cache_epoch_seconds(data, cfg, epochs=1, max_steps=steps)
        full = seconds * math.ceil(n / 64) / ran
        params = sum(p.numel() for p in classifier.parameters())
        how = "measured" if steps is None else f"{ran} steps timed, extrapolated"
        print(
            f"{name:<28}{params / 1e6:>7.1f}M params  epoch of {n}: {full:>8.1f} s ({how}); "
            f"16k clips: {full * 16115 / n / 60:>6.1f} min"
        )


if __name__ == "__main__":
    main()

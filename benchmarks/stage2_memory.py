"""Peak memory of ``amflow train-heads --memory-budget`` on stores larger than the budget, and the epoch
time of a streamed run against an in-memory run on the same store.

The stores have the shape stage 1 writes for ``configs/models/amflow_tiny.yaml`` with a wide bottleneck
(``model.bottleneck=8192``: 12 blocks -> 24 adapters x 8 frames x 8192, float16, ~3.1 MB a clip, CLS 192),
one view, no flow maps. Their features are synthetic (class-dependent pattern plus noise), written through
the store's writer: stage 2 reads only the arrays, shapes, labels and provenance, so it cannot tell them
from extracted ones, and extracting ~8 GB of features with the model would take an hour here. Each
``train-heads`` runs in its own process; its peak RSS comes from ``wait4``. Example:

    python benchmarks/stage2_memory.py --dir /work/bench_stage2     # ~1.5 GB and ~6 GB stores, deleted after
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from store import FeatureStore

ADAPTERS, FRAMES, CLS_DIM, CLASSES = 24, 8, 192, 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="scratch folder for the stores (deleted after)")
    p.add_argument("--bottleneck", type=int, default=8192)
    p.add_argument("--sizes-gb", default="1.5,6", help="store sizes to build (GB)")
    p.add_argument("--budget", default="1GB", help="--memory-budget of the streamed runs")
    p.add_argument("--val-clips", type=int, default=48)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the stores")
    return p.parse_args()


def build_store(path: Path, clips: int, dim: int, seed: int) -> float:
    """A store of ``clips`` synthetic clips (labels learnable from the embeddings); returns its GB."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, clips)
    patterns = (
        np.random.default_rng(99).standard_normal((CLASSES, ADAPTERS, 1, FRAMES, dim)).astype(np.float16)
    )
    noise = rng.standard_normal(ADAPTERS * FRAMES * dim + 4096).astype(np.float16)
    st = FeatureStore.create(
        path,
        clip_ids=[f"clip_{i:06d}.mp4" for i in range(clips)],
        labels=labels,
        num_adapters=ADAPTERS,
        num_views=1,
        num_frames=FRAMES,
        embed_dim=dim,
        cls_dim=CLS_DIM,
        provenance={"benchmark": "stage2_memory"},
        class_names=[f"class{c}" for c in range(CLASSES)],
        fingerprint_fields={"benchmark": "stage2_memory", "bottleneck": dim},
        overwrite=True,
    )
    n = ADAPTERS * FRAMES * dim
    for shard in range(st.num_shards):
        with st.shard_writer(shard, durable=False) as w:
            for i in w.pending():
                start = int(rng.integers(0, 4096))
                emb = patterns[labels[i]] + noise[start : start + n].reshape(ADAPTERS, 1, FRAMES, dim)
                w.put(int(i), embeddings=emb, cls=noise[start : start + CLS_DIM].reshape(1, CLS_DIM))
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def train_heads(store: Path, val: Path, out: Path, budget: str, epochs: int) -> tuple[float, dict]:
    """Runs ``amflow train-heads`` in a fresh process: (peak RSS in GB, metrics.json)."""
    argv = [sys.executable, "-m", "amflow.cli", "train-heads", "--store", str(store), "--val-store", str(val)]
    argv += ["--config", "configs/heads/tiny.yaml", "--out", str(out), "--overwrite", "--quiet"]
    argv += ["--memory-budget", budget, "heads.hidden=8", "heads.flow_maps=false", f"epochs={epochs}"]
    argv += ["warmup_epochs=0", "batch_size=32"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train-heads failed on {store}:\n{err}")
    metrics = json.loads((out / "metrics.json").read_text())
    with (out / "curve.csv").open() as f:
        seconds = [float(r["train_seconds"]) for r in csv.DictReader(f)]
    # the first epoch streams the store from disk; later ones find it in the page cache when it fits there
    metrics["first_epoch"] = seconds[0]
    metrics["later_epochs"] = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return usage.ru_maxrss / 1e6, metrics  # ru_maxrss is in KiB


def main() -> None:
    args = parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    clip_bytes = ADAPTERS * FRAMES * args.bottleneck * 2 + CLS_DIM * 2
    sizes = [float(s) for s in args.sizes_gb.split(",")]
    rows = []
    try:
        t = time.perf_counter()
        val = args.dir / "val.zarr"
        build_store(val, args.val_clips, args.bottleneck, seed=1)
        stores = []
        for k, gb in enumerate(sizes):
            path = args.dir / f"train_{gb:g}gb.zarr"
            stores.append((path, build_store(path, int(gb * 1e9 / clip_bytes), args.bottleneck, seed=10 + k)))
        print(f"built {len(stores)} stores + validation store in {time.perf_counter() - t:.0f} s")
        for path, gb in stores:
            rss, m = train_heads(path, val, args.dir / f"run_{path.stem}", args.budget, args.epochs)
            rows.append(
                (path.stem, gb, args.budget, rss, m["first_epoch"], m["later_epochs"], m["val"]["top1"])
            )
            print(f"  {rows[-1]}", flush=True)
        small, _ = stores[0]
        rss, m = train_heads(small, val, args.dir / "run_in_memory", "64GB", args.epochs)
        rows.append(
            (
                small.stem,
                stores[0][1],
                "64GB (in memory)",
                rss,
                m["first_epoch"],
                m["later_epochs"],
                m["val"]["top1"],
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(
        f"\n{'store':<18}{'GB':>7}{'budget':>20}{'peak RSS GB':>13}{'RSS/size':>10}"
        f"{'epoch 1 s':>11}{'later s':>9}{'val top1':>10}"
    )
    for name, gb, budget, rss, first, later, top1 in rows:
        print(
            f"{name:<18}{gb:>7.2f}{budget:>20}{rss:>13.2f}{rss / gb:>10.2f}"
            f"{first:>11.1f}{later:>9.1f}{top1:>10.3f}"
        )
    big, small_streamed, in_memory = rows[len(sizes) - 1], rows[0], rows[-1]
    print(f"larger store: peak RSS / size = {big[3] / big[1]:.2f} (target < 0.40)")
    print(f"larger / smaller store peak RSS = {big[3] / small_streamed[3]:.2f} (target < 1.5)")
    print(
        "epoch time streamed / in memory, same store: first epoch (streamed reads the store from disk) "
        f"{small_streamed[4] / in_memory[4]:.2f}, later epochs {small_streamed[5] / in_memory[5]:.2f} "
        "(target <= 1.3)"
    )


if __name__ == "__main__":
    main()

"""Validation accuracy of heads trained on test-time views (K = 0) vs K = 1 and K = 4 augmented training
views per clip (``amflow extract --train-views K``), and the training store's size per K.

Two generated datasets (stage1_extract/videos/synthetic.py, the demo's motion-only classes, tiny random ViT):
``demo`` is the demo's static-camera data (square 64 px videos: a random crop can only move along time);
``varied`` has more appearance variation: 64x96 px videos (random crops move sideways over the frame)
and half of the clips with a panning camera. Flips stay off: they would swap the classes left and right.
Example (about 10 minutes on 2 busy cores), and the README's table (about 15 minutes):

    python benchmarks/train_views.py --out /tmp/train_views
    python benchmarks/train_views.py --out /tmp/train_views --train-per-class 100 --val-per-class 25 \
        --seeds 3 --rows c --epochs 40
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from pathlib import Path

from stage1_extract.extraction.extract import ExtractOptions, plan_extraction, run_extraction
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.demo import MODEL_CONFIG, MOTIONS, demo_rows
from stage2_temporal.training.train import train_heads_from_stores

DATASETS = {"demo": ((64, 64), 0.0), "varied": ((64, 96), 0.5)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-per-class", type=int, default=30)
    p.add_argument("--val-per-class", type=int, default=15)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--video-frames", type=int, default=16, help="frames per generated video")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--views", default="0,1,4", help="K values (0 = test-time views)")
    p.add_argument("--seeds", type=int, default=2, help="heads trained with this many seeds, averaged")
    p.add_argument("--rows", default="c,d", help="demo rows: c (AM-flow map heads), d (all averaged)")
    p.add_argument("--keep", action="store_true")
    return p.parse_args()


def extract(videos: Path, split: str, out: Path, k: int, frames: int) -> float:
    """Extracts a split (K training views, or the test views for K = 0); returns its features' MB."""
    plan, store = plan_extraction(
        "folder",
        videos,
        split,
        MODEL_CONFIG,
        out,
        overrides=[f"num_frames={frames}", "model.backbone.img_size=64"],
        options=ExtractOptions(
            store_flow=True, decode_workers=0, batch_size=16, threads=os.cpu_count(), train_views=k
        ),
    )
    run_extraction(plan, store)
    return store.layout.clip_bytes() * store.num_clips / 1e6  # the data (the last shard file is padded)


def main() -> None:
    args = parse_args()
    ks = [int(k) for k in args.views.split(",")]
    wanted = tuple(f"({r.strip()})" for r in args.rows.split(","))
    rows = [r for r in demo_rows(args.epochs, 0) if r.name.startswith(wanted)]
    results = []
    try:
        for name, (size, pan) in DATASETS.items():
            videos = args.out / name / "videos"
            splits = {"train": args.train_per_class, "val": args.val_per_class}
            make_folder_dataset(videos, MOTIONS, splits, size, args.video_frames, seed=0, pan_fraction=pan)
            val = args.out / name / "val.zarr"
            extract(videos, "val", val, 0, args.frames)
            for k in ks:
                t = time.perf_counter()
                train = args.out / name / f"train_k{k}.zarr"
                mb = extract(videos, "train", train, k, args.frames)
                seconds = time.perf_counter() - t
                for row in rows:
                    accs = []
                    for seed in range(args.seeds):
                        cfg = dataclasses.replace(row.train, seed=seed)
                        run = args.out / name / f"run_k{k}_{row.name[:3]}_{seed}"
                        m = train_heads_from_stores(train, val, cfg, run, progress=False)
                        accs.append(m["val"]["mean_class_acc"])
                    results.append((name, k, row.name, mb, seconds, sum(accs) / len(accs)))
                    print(results[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    print(
        f"\n{'data':<8}{'K':>3}  {'branches':<28}{'train data MB':>15}{'extract s':>11}{'val mean acc':>14}"
    )
    for name, k, row, mb, seconds, acc in results:
        print(f"{name:<8}{k:>3}  {row[:28]:<28}{mb:>15.1f}{seconds:>11.0f}{100 * acc:>13.1f}%")
    print("K = 0: the test-time view (middle frame per segment, centre crop); val stores always use it")


if __name__ == "__main__":
    main()

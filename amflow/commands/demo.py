"""``amflow demo``: generated motion-only videos through the whole pipeline, with a comparison table."""

from __future__ import annotations

import argparse

from amflow.commands.options import POSITIVE, SEED, with_paths
from store.outputs import Input, Output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on generated motion-only videos and print what each branch achieves",
        description="Generates small mp4 datasets (folder layout; static and panning camera) whose classes "
        "differ only in motion, extracts stores with a randomly initialised tiny ViT (stage 1), trains "
        "heads from the cache (stage 2), evaluates on the test split and prints mean per-class accuracy of: "
        "the last-frame appearance baseline, temporal heads on adapter embeddings, AM-flow map heads, all "
        "branches averaged, and a control (the same heads on token-feature differences). Deterministic for "
        "a seed and thread count; about 8 minutes on 2 CPU cores (--quick: about 4). Re-running reuses "
        "what exists.",
        epilog="example:\n  amflow demo --out demo_out\n  amflow demo --quick --out /tmp/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo_out", help="working folder (videos, stores, runs, results)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a reduced run with fewer clips and epochs")
    size.add_argument(
        "--smoke",
        action="store_true",
        help="the whole pipeline in seconds (4 clips a class, 32 px, 4 frames, 4 epochs): checks that it "
        "runs and reproduces; its numbers mean nothing",
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed of the videos, adapters and heads")
    p.add_argument(
        "--threads",
        type=POSITIVE,
        default=2,
        help="torch CPU threads for every stage (default 2); the table is the same on every run for a seed "
        "and thread count",
    )
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The working folder: continued when it exists (what is there is reused)."""
    return [Output("--out", args.out, resumable=True, folder=True)], []


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import warnings

    from stage1_extract.families.backbone import RANDOM_INIT_WARNING
    from stage2_temporal.demo import DemoConfig, format_predictions, format_table, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig.smoke() if args.smoke else DemoConfig()
    cfg = dataclasses.replace(cfg, seed=args.seed, threads=args.threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
        result = run_demo(args.out, cfg)
    print(format_table(result))
    print("\npredicting on two test videos with the AM-flow map heads:")
    print(format_predictions(result, args.out))
    print(f"\nresults: {args.out}/results.json; runs (metrics, curves, confusion matrices): {args.out}/runs")
    return 0

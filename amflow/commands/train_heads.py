"""``amflow train-heads``: temporal heads trained from a cached store, scored on a validation store."""

from __future__ import annotations

import argparse

from amflow.commands.options import add_allow_incomplete, add_memory_budget, add_no_tensorboard, with_paths
from store.outputs import Input, Output

EPILOG = """example:
  amflow train-heads --store runs/cs/train.zarr --val-store runs/cs/val.zarr \\
      --config configs/heads/lstm.yaml --out runs/cs/lstm heads.hidden=256 lr=1e-3

The run directory gets config.yaml, fingerprint.json, heads.safetensors, curve.csv/png,
confusion_val.csv/png and, last, metrics.json (its presence means the run finished)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``train-heads``."""
    p = subparsers.add_parser(
        "train-heads",
        help="train the temporal heads and the averaging classifier from cached features",
        description="Trains one temporal head per cached adapter (lstm, tcn or transformer), optional "
        "AM-flow map heads and the last-frame linear branch, logits averaged (paper 000, sec. 3.2), "
        "with AdamW and a cosine schedule, early-stopped on the validation mean class accuracy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", required=True, metavar="TRAIN.zarr", help="training feature store")
    p.add_argument("--val-store", required=True, metavar="VAL.zarr", help="validation feature store")
    p.add_argument("--config", required=True, help="training YAML (configs/heads/...)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    p.add_argument(
        "--force",
        action="store_true",
        help="use a validation store made with other feature settings (warns, naming them)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain into a RUN_DIR holding a run (the old one is first moved to RUN_DIR.replaced-<time>)",
    )
    add_allow_incomplete(p)
    add_memory_budget(p)
    p.add_argument(
        "--features-on-device",
        action="store_true",
        help="with device=cuda: hold the selected features on the GPU when they fit (half its free memory)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_no_tensorboard(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="training config overrides, bare or train.-prefixed: heads.hidden=256 train.lr=1e-3",
    )
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The run directory (a finished run needs --overwrite, which moves it aside; checked in ``run``)."""
    inputs = [
        Input("--store", args.store),
        Input("--val-store", args.val_store),
        Input("--config", args.config),
    ]
    return [Output("--out", args.out, resumable=True, folder=True)], inputs


def run(args: argparse.Namespace) -> int:
    """Loads the config, trains, prints the validation table."""
    from foundation.config import load_config, route_overrides
    from stage2_temporal.training.config import TrainConfig
    from stage2_temporal.training.metrics import format_table
    from stage2_temporal.training.run_dir import is_finished
    from stage2_temporal.training.train import train_heads_from_stores

    overrides = route_overrides(args.overrides, {"train": TrainConfig})["train"]
    cfg = load_config(TrainConfig, args.config, overrides)
    if is_finished(args.out) and not args.overwrite:
        raise ValueError(
            f"--out {args.out}: already holds a finished run (metrics.json); "
            "pass --overwrite to retrain it or choose another directory"
        )
    m = train_heads_from_stores(
        args.store,
        args.val_store,
        cfg,
        args.out,
        args.force,
        not args.quiet,
        args.memory_budget,
        args.features_on_device,
        tensorboard=args.tensorboard,
        allow_incomplete=args.allow_incomplete,
        overwrite=args.overwrite,
    )
    title = (
        f"validation ({args.val_store}), best epoch {m['best_epoch']} of {m['epochs_run']}, "
        f"{m['seconds']:.1f} s, {m['trainable_parameters']:,} trainable parameters"
    )
    print(format_table(m["val"], m["class_names"], title))
    print(f"\nrun written to {args.out}")
    return 0

"""``amflow evaluate``: score a trained run of ``train-heads`` on another store (e.g. the test split)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="score trained heads on a store: top-1, top-5, mean class accuracy, per-class accuracy",
        description="Scores the heads of a train-heads run on a feature store (softmax probabilities "
        "averaged over views), prints the table and writes eval_<store>.json and "
        "confusion_<store>.csv/png into the run directory.",
        epilog="example:\n  amflow evaluate --store runs/cs/test.zarr --run runs/cs/lstm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", required=True, metavar="TEST.zarr", help="feature store to score")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory of amflow train-heads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--force",
        action="store_true",
        help="score a store made with other feature settings (warns, naming them)",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="use a store whose extraction has not finished (only its done clips; says how many)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluates and prints the table."""
    from stage2_temporal.data import store_name
    from stage2_temporal.evaluate import evaluate_store
    from stage2_temporal.metrics import format_table

    m = evaluate_store(
        args.run,
        args.store,
        force=args.force,
        device=args.device,
        progress=not args.quiet,
        allow_incomplete=args.allow_incomplete,
    )
    print(format_table(m, m["class_names"], f"{args.run} on {args.store}"))
    print(f"\nwritten: {args.run}/eval_{store_name(args.store)}.json")
    return 0

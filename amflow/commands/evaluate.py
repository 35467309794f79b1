"""``amflow evaluate``: score trained runs of ``train-heads`` on another store (e.g. the test split)."""

from __future__ import annotations

import argparse

from amflow.commands.options import add_allow_incomplete, add_device, add_memory_budget, with_paths
from store.outputs import Input, Output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="score trained heads on a store: top-1, top-5, mean class accuracy, per-class accuracy",
        description="Scores the heads of a train-heads run on a feature store (softmax probabilities "
        "averaged over views), prints the table and writes eval_<store>.json, confusion_<store>.csv/png "
        "and predictions_<store>.csv (per clip: clip_id,label,prediction,confidence, then one "
        "probability per class) into the run directory. Several --run: each is scored, then the "
        "ensemble (their probabilities averaged).",
        epilog="examples:\n  amflow evaluate --store runs/cs/test.zarr --run runs/cs/lstm\n"
        "  amflow evaluate --store runs/cs/test.zarr --run runs/cs/lstm --run runs/cs/tcn   (ensemble)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", required=True, metavar="TEST.zarr", help="feature store to score")
    p.add_argument(
        "--run",
        required=True,
        action="append",
        metavar="RUN_DIR",
        help="run directory of amflow train-heads (repeat for an ensemble)",
    )
    add_device(p, "cpu", "cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--force",
        action="store_true",
        help="score a store made with other feature settings (warns, naming them)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the evaluation files of this store in the runs"
    )
    add_memory_budget(p)
    add_allow_incomplete(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """Each run gets eval_<store>.json, confusion_<store>.csv/png and predictions_<store>.csv."""
    from stage2_temporal.training.checks import check_finished_run
    from stage2_temporal.training.evaluate import evaluation_files, run_inputs

    for run in args.run:  # an unfinished run is the first thing to say
        check_finished_run(run)
    outputs = [
        Output("evaluation file", path, replace=args.overwrite)
        for run in args.run
        for path in evaluation_files(run, args.store)
    ]
    inputs = [Input("--store", args.store)]
    inputs += [Input(f"--run {run}", path) for run in args.run for path in run_inputs(run)]
    return outputs, inputs


def run(args: argparse.Namespace) -> int:
    """Evaluates and prints the table (per run, then the ensemble's)."""
    from stage2_temporal.training.data import store_name
    from stage2_temporal.training.evaluate import evaluate_ensemble
    from stage2_temporal.training.metrics import format_table

    ensemble, single = evaluate_ensemble(
        args.run,
        args.store,
        force=args.force,
        device=args.device,
        progress=not args.quiet,
        memory_budget=args.memory_budget,
        allow_incomplete=args.allow_incomplete,
    )
    name = store_name(args.store)
    for run_dir, m in zip(args.run, single):
        print(format_table(m, m["class_names"], f"{run_dir} on {args.store}"))
        print(f"\nwritten: {run_dir}/eval_{name}.json, {run_dir}/predictions_{name}.csv\n")
    if len(args.run) > 1:
        title = f"ensemble of {len(args.run)} runs (probabilities averaged) on {args.store}"
        print(format_table(ensemble, ensemble["class_names"], title))
    return 0

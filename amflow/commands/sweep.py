"""``amflow sweep``: train every combination of a grid of head configs in parallel; write a leaderboard."""

from __future__ import annotations

import argparse

from amflow.commands.options import (
    NON_NEGATIVE,
    add_allow_incomplete,
    add_memory_budget,
    add_no_tensorboard,
    with_paths,
)
from store.outputs import Input, Output

EPILOG = """examples:
  amflow sweep --store runs/cs/train.zarr --val-store runs/cs/val.zarr \\
      --grid configs/sweeps/smarthome.yaml --out sweeps/cs --workers 4
  amflow sweep ... --scheduler tcp://10.0.0.5:8786      (an existing dask cluster)

Each combination trains in runs/<hash of its config>/; a finished run (metrics.json) is skipped when the
sweep is started again, so an interrupted sweep resumes. Writes leaderboard.csv/.md/.png."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``sweep``."""
    p = subparsers.add_parser(
        "sweep",
        help="train every combination of a grid of heads configs in parallel (dask) and rank them",
        description="Reads both stores once, sends them once to every dask worker, trains every "
        "unfinished combination of the grid (head type, sizes, lr, weight decay, epochs, adapter and "
        "block subsets, flow-map heads, mean vs voting) and ranks the runs by validation mean class "
        "accuracy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", required=True, metavar="TRAIN.zarr", help="training feature store")
    p.add_argument("--val-store", required=True, metavar="VAL.zarr", help="validation feature store")
    p.add_argument("--grid", required=True, help="sweep YAML (configs/sweeps/...)")
    p.add_argument("--out", required=True, metavar="SWEEP_DIR", help="sweep directory (resumed if it exists)")
    p.add_argument(
        "--workers",
        type=NON_NEGATIVE,
        default=2,
        help="local dask worker processes (default 2); 0 trains in this process",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="address of an existing dask scheduler (tcp:// or tls://; TLS credentials from dask's config)",
    )
    p.add_argument("--force", action="store_true", help="accept stores made with other feature settings")
    add_memory_budget(p)
    add_allow_incomplete(p)
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the dask dashboard of the local cluster on 127.0.0.1:8787",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_no_tensorboard(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="training config overrides for every run, bare or train.-prefixed: epochs=5 train.patience=2",
    )
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The sweep directory: resumed when it exists."""
    inputs = [Input("--store", args.store), Input("--val-store", args.val_store), Input("--grid", args.grid)]
    return [Output("--out", args.out, resumable=True, folder=True)], inputs


def run(args: argparse.Namespace) -> int:
    """Sweeps and prints the top of the leaderboard; exit 1 when a run failed."""
    from stage2_temporal.sweeps.sweep import run_sweep_from_stores

    result = run_sweep_from_stores(
        args.store,
        args.val_store,
        args.grid,
        args.out,
        args.workers,
        args.scheduler,
        args.force,
        not args.quiet,
        overrides=args.overrides,
        memory_budget=args.memory_budget,
        tensorboard=args.tensorboard,
        allow_incomplete=args.allow_incomplete,
        dashboard=args.dashboard,
    )
    lines = result.leaderboard_md.read_text().splitlines()
    print("\n".join(lines[:12]) + ("\n..." if len(lines) > 12 else ""))
    print(
        f"\n{result.runs} runs: {result.trained} trained, {result.skipped} already finished, "
        f"{len(result.failed)} failed, {result.seconds:.1f} s; leaderboard: {result.leaderboard_md}"
    )
    for path in result.failed:
        print(f"failed: {path} (see error.txt there)")
    return 1 if result.failed else 0

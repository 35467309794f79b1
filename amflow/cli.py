"""The ``amflow`` command: one subcommand per verb, each in ``amflow/commands/``."""

from __future__ import annotations

import argparse
import logging
import sys

from amflow import __version__
from amflow.commands import (
    datasets,
    demo,
    evaluate,
    export,
    extract,
    finetune,
    merge,
    model_info,
    predict,
    store,
    sweep,
    train_heads,
    visualize,
)

# In the order a newcomer meets them: demo, stage 1, the store, stage 2, finetuning, ZeroI2V, using a
# trained model, pictures.
COMMANDS = (
    demo,
    model_info,
    datasets,
    extract,
    store,
    train_heads,
    sweep,
    evaluate,
    finetune,
    merge,
    predict,
    export,
    visualize,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="amflow",
        description="Turn a frozen image transformer (any timm ViT) into a video action recogniser: "
        "AM-flow adapters or ZeroI2V, stage 1 feature extraction to a Zarr cache, stage 2 temporal "
        "heads trained from the cache, end-to-end finetuning.",
        epilog="example: amflow demo --out demo_out   (generates videos, extracts, trains, prints a table)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"amflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    from stage1_extract.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"amflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

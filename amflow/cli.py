"""The ``amflow`` command: one subcommand per verb, each in ``amflow/commands/``."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import NoReturn

from amflow import __version__
from amflow.commands import (
    convert,
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
    convert,
    predict,
    export,
    visualize,
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``amflow CMD: error: argument --x: expected ...`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = Parser(
        prog="amflow",
        description="Turn a frozen image transformer (any timm ViT) into a video action recogniser: "
        "AM-flow adapters or ZeroI2V, stage 1 feature extraction to a Zarr cache, stage 2 temporal "
        "heads trained from the cache, end-to-end finetuning.",
        epilog="example: amflow demo --out demo_out   (generates videos, extracts, trains, prints a table)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"amflow {__version__}")
    verbose = {"action": "store_true", "help": "log debug messages; show the traceback of an error"}
    parser.add_argument("-v", "--verbose", **verbose)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    _add_verbose(sub, verbose)  # also after the command: amflow extract ... -v, amflow store info X -v
    return parser


def _add_verbose(sub: argparse._SubParsersAction, verbose: dict) -> None:
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", **verbose, default=argparse.SUPPRESS)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_verbose(action, verbose)


# How torch re-raises an error of a DataLoader worker process: the same type, its message the worker's
# whole traceback after this line.
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def _one_line(error: BaseException) -> str:
    """The error as one line: ``FILE: reason`` for the OS's errors, the message itself for ours (also
    when torch re-raises it from a decoding worker: the worker's traceback is dropped)."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    if WORKER_TRACEBACK in text:
        last = text.strip().splitlines()[-1].strip()
        cls = type(error)
        for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            if last.startswith(prefix):
                return last.removeprefix(prefix)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a user error (bad config, argument, file, disk) prints one line and returns 2.

    Every command checks its outputs first (``options.with_paths``), so a refusal leaves the disk as it was.

    ``ValueError`` (``ConfigError``, ``StoreError``, ...) and ``OSError`` (missing or existing file,
    permission, no space left, read-only file system) are user errors; Ctrl-C returns 130. ``-v`` also
    prints the traceback. Any other exception is a bug and propagates with its traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own exits: --help and --version (0), a bad argument (2)
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    name = " ".join(
        str(part)
        for part in (args.command, getattr(args, "store_command", None), getattr(args, "action", None))
        if part
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print(f"amflow {name}: error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"amflow {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

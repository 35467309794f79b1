"""Command-line options that several commands share, defined once (same flag, same help, same meaning)."""

from __future__ import annotations

import argparse
import functools
import math
import re
from collections.abc import Callable

from store.outputs import Input, Output, check_outputs


def add_weights_options(p: argparse.ArgumentParser) -> None:
    """``--weights`` and ``--pretrained``: where the frozen backbone's weights come from."""
    p.add_argument(
        "--weights", help="local backbone weights (file or transformers folder); same as backbone.weights="
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's pretrained weights of the backbone's tag (HF hub, or its cache offline); "
        "same as backbone.pretrained=true",
    )


def add_memory_budget(p: argparse.ArgumentParser) -> None:
    """``--memory-budget``: features in memory up to a size, else streamed from the store."""
    p.add_argument(
        "--memory-budget",
        metavar="BYTES",
        type=memory_budget,
        help="hold the selected features in memory up to this size (e.g. 1GB, 512MiB, or a fraction of the "
        "available RAM such as 0.25; default half the available RAM), else stream them from the store",
    )


def add_allow_incomplete(p: argparse.ArgumentParser) -> None:
    """``--allow-incomplete``: use the done clips of a store whose extraction has not finished."""
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="use a store whose extraction has not finished (only its done clips; says how many)",
    )


def add_no_tensorboard(p: argparse.ArgumentParser) -> None:
    """``--no-tensorboard``: no event files in the run directory."""
    p.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        help="no TensorBoard event files in the run directory (written when tensorboard is installed)",
    )


# ------------------------------------------------------------------------ ranges, enforced when parsed


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (else one line and exit 2, never reinterpreted)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number_in(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (``(low, ...`` with ``low_open``)."""
    span = (
        f"{'>' if low_open else '>='} {low:g}"
        if high is None
        else (f"in {'(' if low_open else '['}{low:g}, {high:g}]")
    )

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a number {span}, got {text}")
        return value

    parse.__name__ = f"number {span}"
    return parse


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def device_name(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (whether it exists: at run time)."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text}")
    return text


def checked_by(validate: Callable[[str], object], what: str) -> Callable[[str], str]:
    """An argparse type: the text as given, once ``validate`` (the parser the command uses later) accepts
    it; its ValueError becomes the one-line parse error."""

    def parse(text: str) -> str:
        try:
            validate(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    parse.__name__ = what
    return parse


def memory_budget(text: str) -> str:
    """An argparse type: bytes with a unit (1GB, 512MiB) or a fraction of the RAM in (0, 1]; kept as text."""
    from stage2_temporal.training.stream import parse_memory_budget

    return checked_by(parse_memory_budget, "memory budget")(text)


def compression(text: str) -> str:
    """An argparse type: a store's compression, ``none``, ``zstd[:level]`` or ``blosc[:level]``."""
    from store.layout import parse_compression

    return checked_by(parse_compression, "compression")(text)


SEED = int_at_least(0)
POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)


def add_device(p: argparse.ArgumentParser, default: str, help: str) -> None:
    """``--device``: where the models run (its spelling checked when parsed)."""
    p.add_argument("--device", default=default, type=device_name, help=help)


# ------------------------------------------------------------------------- outputs, checked before work

# What a command writes and reads, as a function of its parsed arguments.
PathPlan = Callable[[argparse.Namespace], tuple[list[Output], list[Input]]]


def with_paths(
    run: Callable[[argparse.Namespace], int], paths: PathPlan
) -> Callable[[argparse.Namespace], int]:
    """``run`` preceded by the check of every path it will write (``store.outputs.check_outputs``): every
    command is registered as ``set_defaults(func=with_paths(run, paths))``, so nothing is created, decoded
    or loaded before its outputs are known to be safe; a refusal leaves the disk as it was."""

    @functools.wraps(run)
    def checked(args: argparse.Namespace) -> int:
        check_outputs(*paths(args))
        return run(args)

    checked.paths = paths  # type: ignore[attr-defined]  (tests read which commands declare their paths)
    return checked


def writes_nothing(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The path plan of a command that writes no file (it prints, or changes its input store in place)."""
    return [], []

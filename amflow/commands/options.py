"""Command-line options that several commands share, defined once (same flag, same help, same meaning)."""

from __future__ import annotations

import argparse


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

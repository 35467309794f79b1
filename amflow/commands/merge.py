"""``amflow merge``: folds a ZeroI2V checkpoint's linear adapters into the frozen backbone (zero cost)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold a ZeroI2V checkpoint's linear adapters into the backbone (plain timm ViT + STDHA)",
        description="Reads a trainable-only ZeroI2V checkpoint (.safetensors, its config in the metadata), "
        "rebuilds the model on its frozen backbone, folds every linear adapter into the linear layer it "
        "wraps (paper 002, eq. 11) and writes the plain timm ViT state dict plus the ZeroI2V head "
        "(keys 'zeroi2v_head.*'): the image model's parameter count and cost, with STDHA attention.",
        epilog="example: amflow merge runs/k400/best.safetensors --out runs/k400/merged.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="trainable-only ZeroI2V checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="merged output file (.safetensors)")
    p.add_argument(
        "--config", default=None, help="model YAML to use instead of the checkpoint's stored config"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stage2_temporal.zeroi2v import merge_checkpoint

    summary = merge_checkpoint(args.checkpoint, args.out, config=args.config, overwrite=args.overwrite)
    rows = [
        ("adapters merged", f"{summary.adapters_merged:,}"),
        ("ViT parameters", f"{summary.vit_parameters:,}"),
        ("head parameters", f"{summary.head_parameters:,}"),
        ("frames", str(summary.num_frames)),
        ("head offsets", str(summary.head_offsets)),
        ("written", str(summary.out_path)),
    ]
    for name, value in rows:
        print(f"{name:<18}{value}")
    return 0

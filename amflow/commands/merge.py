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
        epilog="example: amflow merge runs/k400/best.safetensors --out runs/k400/merged.safetensors "
        "--onnx runs/k400/model.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="trainable-only ZeroI2V checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="merged output file (.safetensors)")
    p.add_argument(
        "--config", default=None, help="model YAML to use instead of the checkpoint's stored config"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--onnx",
        metavar="MODEL.onnx",
        help="also export the merged classifier to ONNX (input: normalised video (batch, T, 3, H, W))",
    )
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
    if args.onnx:
        import json

        from stage1_extract.checkpoint import read_metadata
        from stage2_temporal.zeroi2v import ZeroI2VModel, load_merged
        from stage2_temporal.zeroi2v_onnx import export_onnx

        names = json.loads(read_metadata(summary.out_path).get("class_names", "null"))
        rows.append(
            ("ONNX", str(export_onnx(ZeroI2VModel(*load_merged(summary.out_path)), args.onnx, names)))
        )
    for name, value in rows:
        print(f"{name:<18}{value}")
    return 0

"""``amflow merge``: folds a ZeroI2V checkpoint's linear adapters into the frozen backbone (zero cost)."""

from __future__ import annotations

import argparse

from amflow.commands.options import with_paths
from store.outputs import Input, Output


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
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --onnx) if they exist")
    p.add_argument(
        "--onnx",
        metavar="MODEL.onnx",
        help="also export the merged classifier to ONNX (input: normalised video (batch, T, 3, H, W))",
    )
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The merged file and the ONNX graph: both checked (and distinct) before anything is merged."""
    outputs = [Output("--out", args.out, replace=args.overwrite)]
    if args.onnx:
        outputs.append(Output("--onnx", args.onnx, replace=args.overwrite))
    return outputs, [Input("CHECKPOINT", args.checkpoint), Input("--config", args.config)]


def run(args: argparse.Namespace) -> int:
    from stage2_temporal.zeroi2v.model import merge_checkpoint

    if args.onnx:
        from stage2_temporal.zeroi2v.onnx import require_onnx

        require_onnx()  # before the merge: a missing package must not leave --out behind

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
        from foundation.formats import read_class_names
        from stage1_extract.methods.checkpoint import read_metadata
        from stage2_temporal.zeroi2v.model import ZeroI2VModel, load_merged
        from stage2_temporal.zeroi2v.onnx import export_onnx

        model = ZeroI2VModel(*load_merged(summary.out_path))
        names = read_class_names(
            read_metadata(summary.out_path), summary.out_path, model.head.fc.out_features
        )
        rows.append(("ONNX", str(export_onnx(model, args.onnx, names))))
    for name, value in rows:
        print(f"{name:<18}{value}")
    return 0

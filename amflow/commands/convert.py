"""``amflow convert``: an official ZeroI2V checkpoint (MCG-NJU/ZeroI2V) -> an amflow ZeroI2V checkpoint."""

from __future__ import annotations

import argparse

from amflow.commands.options import with_paths
from store.outputs import Input, Output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an official ZeroI2V checkpoint (mmaction2 keys) to an amflow ZeroI2V checkpoint",
        description="Reads a checkpoint of the ZeroI2V release (keys backbone.transformer.resblocks.N."
        "{T_Adapter_in,S_Adapter,MLP_Adapter,...}, cls_head.fc_cls) and writes an amflow ZeroI2V checkpoint "
        "(adapters + head, the config in its metadata) that amflow merge, finetune (init_checkpoint=) and "
        "amflow extract --checkpoint take, plus the backbone it runs on (the release's CLIP weights with "
        "its trained final norm) beside it. The adapter scale and the STDHA head offsets are not stored "
        "in the release's checkpoints: the config must give them as the release's own config does "
        "(adapter_scale; shift_div 12 on ViT-B -> {-1: 1, +1: 1, 0: 10}, 8 on ViT-L -> "
        "{-1: 2, +1: 2, 0: 12}).",
        epilog="example:\n  amflow convert zeroi2v_k400_vitb16.pth --config "
        "configs/models/zeroi2v_vitb16_clip_k400_8f.yaml --out zi2v_k400.safetensors\n"
        "  amflow merge zi2v_k400.safetensors --out zi2v_k400_merged.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="the release's checkpoint (.pth; its 'state_dict' is read)")
    p.add_argument("--config", required=True, help="model YAML (kind: zeroi2v) describing the release model")
    p.add_argument("--out", required=True, help="amflow ZeroI2V checkpoint to write (.safetensors)")
    p.add_argument(
        "--backbone-out", default=None, help="where to write the backbone (default: OUT.backbone.safetensors)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output files if they exist")
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The converted checkpoint and its backbone (default OUT.backbone.safetensors)."""
    from pathlib import Path

    from stage2_temporal.zeroi2v.release import default_backbone_path

    backbone = args.backbone_out or default_backbone_path(Path(args.out))
    outputs = [Output("--out", args.out, replace=args.overwrite)]
    outputs.append(Output("--backbone-out", backbone, replace=args.overwrite))
    return outputs, [Input("CHECKPOINT", args.checkpoint), Input("--config", args.config)]


def run(args: argparse.Namespace) -> int:
    from stage2_temporal.zeroi2v.release import convert_release_checkpoint, load_release_config

    cfg = load_release_config(args.config)
    try:
        summary = convert_release_checkpoint(
            args.checkpoint, cfg, args.out, backbone_path=args.backbone_out, overwrite=args.overwrite
        )
    except FileExistsError as e:  # one line and exit 2, like every bad argument
        raise ValueError(str(e)) from e
    rows = [
        ("adapter places", ", ".join(summary.adapter_places)),
        ("adapters", f"{summary.adapters:,}"),
        ("frames", str(summary.num_frames)),
        ("classes", str(summary.num_classes)),
        ("head offsets", str(summary.head_offsets)),
        ("checkpoint", str(summary.out_path)),
        ("backbone", str(summary.backbone_path)),
    ]
    for name, value in rows:
        print(f"{name:<16}{value}")
    return 0

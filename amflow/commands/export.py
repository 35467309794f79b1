"""``amflow export``: a trained run (or a merged ZeroI2V model) as one file for ``amflow predict --model``."""

from __future__ import annotations

import argparse

from amflow.commands.options import with_paths
from store.outputs import Input, Output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``export``."""
    p = subparsers.add_parser(
        "export",
        help="bundle a run (train-heads, finetune) or merged model into one file for predict --model",
        description="Writes one .safetensors holding all amflow predict needs: the model (frozen "
        "backbone with adapters, the finetuned model, or the merged ZeroI2V backbone), the heads, the "
        "model and dataset configs (frames, sampling, views, crop size), class names and the input "
        "normalisation (JSON in the safetensors metadata). No run directory or weights file is needed "
        "to use it.",
        epilog="example:\n  amflow export runs/cs_lstm --out cs_lstm.safetensors\n"
        "  amflow predict clip.mp4 --model cs_lstm.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a train-heads or finetune run directory, or a merged model")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the file to write")
    p.add_argument("--weights", help="local backbone weights, if the run's recorded path has moved")
    p.add_argument("--checkpoint", help="stage-1 checkpoint (heads runs) or the finetune checkpoint to use")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """--out must not be (or replace a file of) the run or model it exports."""
    inputs = [
        Input("RUN", args.run),
        Input("--weights", args.weights),
        Input("--checkpoint", args.checkpoint),
    ]
    return [Output("--out", args.out, replace=args.overwrite)], inputs


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stage2_temporal.inference.export import export_predictor
    from stage2_temporal.inference.predict import load_predictor

    source = Path(args.run)
    predictor = load_predictor(
        source if source.is_dir() else None,
        None if source.is_dir() else source,
        weights=args.weights,
        checkpoint=args.checkpoint,
        device="cpu",
    )
    out = export_predictor(predictor, args.out, overwrite=args.overwrite)
    size = out.stat().st_size / 2**20
    print(
        f"exported a {predictor.kind} model ({len(predictor.class_names)} classes) to {out} ({size:.1f} MiB)"
    )
    return 0

"""``amflow visualize``: a video's frames with each chosen block's AM flow drawn over them (PNG, GIF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from amflow.commands.options import add_device, add_weights_options, int_at_least, number_in, with_paths
from store.outputs import Input, Output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "visualize",
        help="draw a video's frames with each block's AM flow as a heatmap over the patches (PNG, GIF)",
        description="Decodes T uniformly sampled frames of VIDEO (middle of each segment, centre crop at the "
        "model's input size), runs the AM-flow model and draws the frames in a row, then for each chosen "
        "AM-flow block a row with its AM flow (summed over heads, one value per patch, prefix tokens "
        "dropped) over the frames; each row has its own colour bar. --gif also writes an animation with "
        "the frame and the blocks' heatmaps side by side. Without --checkpoint the adapters are fresh "
        "(from the config's seed); their zero-initialised up-projections leave the backbone unchanged, so "
        "the maps are the frozen backbone's own AM flow (unless the config adds an aligning encoder).",
        epilog="examples:\n"
        "  amflow visualize clip.mp4 --config configs/models/amflow_tiny.yaml --out flow.png --gif\n"
        "  amflow visualize Walk_p03_r01_v16_c01.mp4 --blocks 1,12 --frames 8 --out walk.png \\\n"
        "      --config configs/models/amflow_vitb14_dinov2_am2_lstm.yaml --checkpoint finetuned.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("video", help="the video file to draw")
    p.add_argument("--config", required=True, help="model YAML (kind: amflow)")
    p.add_argument("--checkpoint", help="finetuned adapters (.safetensors) or a merged ZeroI2V model")
    add_weights_options(p)
    p.add_argument("--blocks", help="1-based AM-flow blocks to draw, comma-separated (default: all)")
    p.add_argument(
        "--frames", type=int_at_least(2), help="frames to sample, >= 2 (default: the config's num_frames)"
    )
    p.add_argument("--out", required=True, help="the figure to write (.png, .pdf, .svg or .jpg)")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF beside it (<out>.gif)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and the GIF) if they exist")
    p.add_argument(
        "--fps",
        type=number_in(0.0, 100.0, low_open=True),
        default=4.0,
        help="GIF frames per second (default 4)",
    )
    p.add_argument(
        "--aligned",
        action="store_true",
        help="models with aligning encoders: per block, a row with the aligners bypassed (frame t+1 as "
        "it is) above the aligned AM flow, so camera motion's flow and what the aligner removes show",
    )
    add_device(p, "cpu", "cpu (default), cuda, cuda:1 ...")
    # An option, not trailing positionals: argparse cannot take positionals both before and after options.
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="key=value",
        help="model config overrides, bare or model.-prefixed: --set seed=1 model.backbone.img_size=64",
    )
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The figure and, with --gif, the GIF beside it."""
    outputs = [Output("--out", args.out, replace=args.overwrite)]
    if args.gif:
        outputs.append(Output("--gif", Path(args.out).with_suffix(".gif"), replace=args.overwrite))
    inputs = [
        Input("VIDEO", args.video),
        Input("--config", args.config),
        Input("--checkpoint", args.checkpoint),
        Input("--weights", args.weights),
    ]
    return outputs, inputs


def _parse_blocks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        blocks = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        blocks = []
    if not blocks or min(blocks) < 1:
        raise ValueError(f"--blocks: expected comma-separated block numbers >= 1 such as 1,12, got {text!r}")
    return blocks


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from foundation.config import route_overrides
    from stage1_extract.extraction.visualize import (
        decode_clip,
        flow_heatmaps,
        frame_size,
        load_visualization_model,
        plot_flow,
        save_gif,
        select_blocks,
    )
    from stage1_extract.methods.amflow_model import AMFlowConfig

    out = Path(args.out)
    if out.suffix.lower() == ".gif":
        raise ValueError(
            f"--out {out}: the still figure (.png, .pdf, .svg, .jpg); --gif writes the GIF beside it"
        )
    if not Path(args.video).is_file():
        raise FileNotFoundError(f"{args.video}: no such video file")
    blocks = _parse_blocks(args.blocks)
    overrides = list(args.overrides) + ([f"model.backbone.weights={args.weights}"] if args.weights else [])
    overrides += ["model.backbone.pretrained=true"] if args.pretrained else []
    overrides = route_overrides(overrides, {"model": AMFlowConfig})["model"]
    model = load_visualization_model(
        args.config, args.checkpoint, num_frames=args.frames, overrides=overrides, device=args.device
    )
    if args.aligned and not model.cfg.aligning_encoder:
        raise ValueError(f"--aligned: {args.config} has no aligning encoder (model.aligning_encoder: false)")
    names = [model.flow_block_names[i] for i in select_blocks(model, blocks)]
    video = decode_clip(args.video, args.frames or model.cfg.num_frames, frame_size(model))
    heatmaps = flow_heatmaps(model, video, blocks)
    if args.aligned:
        bypassed = flow_heatmaps(model, video, blocks, bypass_aligners=True)
        heatmaps = np.stack([m for pair in zip(bypassed, heatmaps) for m in pair])
        names = [f"{n} {view}" for n in names for view in ("unaligned", "aligned")]
    quantity = "AM flow" if model.cfg.maps == "am_flow" else "feature difference (control)"
    title = f"{Path(args.video).name}: {Path(args.config).stem}"
    shared = 2 if args.aligned else 1  # a block's unaligned and aligned rows on one colour scale
    written = [plot_flow(video, heatmaps, names, out, title=title, quantity=quantity, shared_scale=shared)]
    if args.gif:
        gif = out.with_suffix(".gif")
        written.append(save_gif(video, heatmaps, names, gif, fps=args.fps, shared_scale=shared))
    print(
        f"{'block':<12}{'max':>10}{'mean':>10}   ({quantity} per patch, sum over heads, {len(video)} frames)"
    )
    for name, maps in zip(names, heatmaps):
        print(f"{name:<12}{maps.max():>10.4g}{maps.mean():>10.4g}")
    for path in written:
        print(f"wrote {path}")
    return 0

"""``amflow predict``: which action a video shows, with a trained run or an exported model."""

from __future__ import annotations

import argparse
import sys

from amflow.commands.options import NON_NEGATIVE, POSITIVE, add_device, number_in, with_paths
from store.outputs import Input, Output

EPILOG = """examples:
  amflow predict clip.mp4 more_clips/ --run runs/cs_lstm
  amflow predict clip.mp4 --run runs/cs_finetune --json
  amflow predict clip.mp4 --model model.safetensors --out predictions.csv
  amflow predict long.mp4 --run runs/cs_lstm --window 4 --stride 1 --out long_timeline.csv

--json prints one line per video: {"video": "<path as given>", "top5": [{"label": "<class>", "prob": 0.83},
...]} (most probable first; windows add "start" and "end" in seconds)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``predict``."""
    p = subparsers.add_parser(
        "predict",
        help="top-5 actions of videos with a trained run (train-heads, finetune) or a model file",
        description="Decodes each video as the run's clips were decoded (frames, clips, crops), runs "
        "stage 1 in memory and the run's heads (or the finetuned / merged model) on every view, averages "
        "the views' softmax probabilities and prints the top-5 classes. Undecodable videos are reported "
        "and skipped. --window/--stride score sliding windows of a long video instead: a timeline CSV "
        "(start, end, top-5) and a PNG of the top classes' probabilities over time. Exit status 1 when no "
        "video could be scored.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO|DIR", help="video files, or folders of videos")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a train-heads or finetune run directory")
    source.add_argument(
        "--model", metavar="FILE", help="an exported model (amflow export) or a merged ZeroI2V model"
    )
    p.add_argument("--weights", help="local backbone weights, if the run's recorded path has moved")
    p.add_argument("--checkpoint", help="stage-1 checkpoint (heads runs) or the finetune checkpoint to use")
    add_device(p, "auto", "auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--batch-size", type=POSITIVE, default=8, help="videos (or windows) per forward (default 8)"
    )
    p.add_argument(
        "--decode-workers", type=NON_NEGATIVE, default=2, help="DataLoader decoding processes (default 2)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per video per line")
    p.add_argument("--out", metavar="FILE.csv", help="also write the top-5 (or the timeline) as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace --out (or the timelines) if it exists")
    seconds = number_in(0.0, low_open=True)
    p.add_argument("--window", type=seconds, metavar="SECONDS", help="score sliding windows of this length")
    p.add_argument(
        "--stride",
        type=seconds,
        metavar="SECONDS",
        help="seconds between windows, > 0 (default: window); at most 10,000 windows per video",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """--out, or with --window each video's timeline CSV and PNG (distinct names, checked together)."""
    from stage2_temporal.inference.predict import expand_videos

    if args.stride is not None and args.window is None:
        raise ValueError("--stride needs --window")
    videos = expand_videos(args.videos)  # the videos themselves: other files beside them are not read
    inputs = [Input("VIDEO", v) for v in videos]
    inputs += [Input(o, getattr(args, o[2:])) for o in ("--run", "--model", "--weights", "--checkpoint")]
    if args.window is None:
        return ([Output("--out", args.out, replace=args.overwrite)] if args.out else []), inputs
    from stage2_temporal.inference.timeline import timeline_paths

    outputs = []
    for video, csv_path in zip(videos, timeline_paths(videos, args.out)):
        option = "--out" if args.out else f"timeline of {video}:"
        outputs.append(Output(option, csv_path, replace=args.overwrite))
        outputs.append(Output(option, csv_path.with_suffix(".png"), replace=args.overwrite))
    return outputs, inputs


def run(args: argparse.Namespace) -> int:
    """Loads the predictor, scores the videos (or windows), prints and writes the results."""
    from stage2_temporal.inference.predict import (
        expand_videos,
        format_prediction,
        load_predictor,
        predict_videos,
        prediction_json,
        write_top_k_csv,
    )

    videos = expand_videos(args.videos)
    if args.window is not None:  # every video's windows are planned (and bounded) before any is decoded
        from stage2_temporal.inference.timeline import (
            plan_timeline,
            predict_timeline,
            timeline_paths,
            write_timeline,
        )

        plans = [plan_timeline(v, args.window, args.stride or args.window) for v in videos]
        outs = timeline_paths(videos, args.out)
    predictor = load_predictor(
        args.run, args.model, weights=args.weights, checkpoint=args.checkpoint, device=args.device
    )
    names = predictor.class_names
    if args.window is not None:
        results = []
        for plan, out in zip(plans, outs):
            windows = predict_timeline(predictor, plan, args.batch_size, args.decode_workers, not args.quiet)
            results.extend(windows)
            if all(w.probs is None for w in windows):
                continue
            csv_path, png_path = write_timeline(windows, names, out)
            print(f"timeline: {csv_path}, {png_path}", file=sys.stderr)
    else:
        results = predict_videos(predictor, videos, args.batch_size, args.decode_workers, not args.quiet)
        if args.out:
            write_top_k_csv(results, names, args.out)
    failed = [r for r in results if r.probs is None]
    for r in results:
        if r.probs is None:
            continue
        print(prediction_json(r, names) if args.json else format_prediction(r, names) + "\n")
    for r in failed:
        print(f"amflow predict: skipped {r.video}: {r.error}", file=sys.stderr)
    if failed:
        print(f"{len(results) - len(failed)} scored, {len(failed)} skipped", file=sys.stderr)
    if args.out and args.window is None:
        print(f"written: {args.out}", file=sys.stderr)
    return 1 if failed and len(failed) == len(results) else 0

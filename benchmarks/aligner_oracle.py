"""What a perfect aligner could give (issue 22): the demo's AM-flow map heads (row c, stage 2) trained on
the AM flow of the fresh tiny model when the generator's true camera motion is undone in the pixels.

Same clips and model as ``benchmarks/aligner_panning.py`` (32 px, 4 frames, AM/2 = blocks 1 and 12,
seed-0 data): for each condition the AM flow of every clip is computed in memory, then the demo's row (c)
heads are trained (``stage2_temporal.training.train.train_heads``) per seed and scored on the test split:

- ``static``: static camera, frames as they are (the reference);
- ``panning, raw``: panning camera, no alignment (the aligner's starting point);
- ``panning, pairwise true shift undone``: for the flow of pair (t, t+1), frame t+1 rolled back by the
  camera's move ``camera[t+1] - camera[t]`` (``alignment.undo_camera``): what a perfect aligning encoder
  (paper 000's design: frame t+1 aligned to frame t) would produce;
- ``panning, all frames undone to frame 1``: every frame rolled back to the first frame's camera (a
  stabilised clip: one reference for the whole clip, outside the paper's pairwise design).

Example (about 5 minutes on 2 busy cores): ``python benchmarks/aligner_oracle.py``; ``--quick`` for tests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "configs" / "models" / "amflow_tiny.yaml"
CONDITIONS = (
    "static",
    "panning, raw",
    "panning, pairwise true shift undone",
    "panning, all frames undone to frame 1",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=25)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--epochs", type=int, default=40, help="epochs of the heads (the demo's 40)")
    p.add_argument("--quick", action="store_true", help="toy sizes for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.train_per_class, args.val_per_class, args.test_per_class, args.epochs = 1, 2, 1, 1, 3
    return args


def flows(model, args: argparse.Namespace, split: str, n: int, condition: str):
    """AM flow (clips, 1 view, blocks, T, h, N) of the split's clips under ``condition``, and labels."""
    from stage1_extract.families.backbone import normalise_video, pixel_stats
    from stage1_extract.methods.alignment import undo_camera
    from stage1_extract.videos.synthetic import render_motion_clip, split_clip_rng
    from stage2_temporal.demo import MOTIONS

    mean, std = pixel_stats(model.vit)
    maps, labels = [], []
    for label, motion in enumerate(MOTIONS):
        for k in range(n):
            clip = render_motion_clip(
                motion,
                size=args.size,
                num_frames=args.frames,
                rng=split_clip_rng(0, split, motion, k),
                pan=condition != "static",
            )
            video = normalise_video(torch.from_numpy(clip.frames).permute(0, 3, 1, 2)[None], mean, std)
            with torch.no_grad():
                if condition == "panning, pairwise true shift undone":
                    pair_flow = model.extract(undo_camera(video, clip.camera[None])[0]).flow[:, :, 0]
                    flow = torch.cat([pair_flow, pair_flow[-1:]]).transpose(0, 1)[None]  # last repeats
                elif condition == "panning, all frames undone to frame 1":
                    moves = np.round(clip.camera - clip.camera[:1]).astype(int)
                    frames = [
                        torch.roll(video[0, t], (-dy, -dx), (-2, -1)) for t, (dy, dx) in enumerate(moves)
                    ]
                    flow = model.extract(torch.stack(frames)[None]).flow
                else:
                    flow = model.extract(video).flow
            maps.append(flow[0].numpy())
            labels.append(label)
    return np.stack(maps)[:, None], np.array(labels)


def cached(model, flow: np.ndarray, labels: np.ndarray, source: str):
    """In-memory features for stage 2's heads: the flow maps (embeddings and CLS are unused by row c)."""
    from stage1_extract.features import feature_type
    from stage2_temporal.demo import MOTIONS
    from stage2_temporal.training.data import CachedFeatures

    n, T = len(labels), flow.shape[3]
    return CachedFeatures(
        embeddings=np.zeros((n, 1, len(model.adapter_names), T, model.bottleneck), np.float32),
        cls=np.zeros((n, 1, model.embed_dim), np.float32),
        labels=labels,
        num_classes=len(MOTIONS),
        adapter_names=model.adapter_names,
        flow=flow,
        flow_block_names=model.flow_block_names,
        flow_geometry=feature_type(model.cfg).layout_of(model).flow_geometry,
        class_names=list(MOTIONS),
        source=source,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from stage1_extract.families.backbone import RANDOM_INIT_WARNING
    from stage2_temporal.demo import demo_rows, deterministic_torch
    from stage2_temporal.finetuning.models import build_model, load_model_config
    from stage2_temporal.training.run_dir import load_heads
    from stage2_temporal.training.train import predict_proba, score, train_heads

    started = time.perf_counter()
    warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
    overrides = [f"num_frames={args.frames}", f"backbone.img_size={args.size}", "blocks=[1,12]"]
    if args.quick:
        overrides += ["backbone.timm_kwargs.depth=2", "blocks=[1,2]", "bottleneck=16"]
    results: dict[str, list[float]] = {}
    with deterministic_torch(1), tempfile.TemporaryDirectory() as tmp:
        model = build_model(load_model_config(MODEL, overrides)).eval()
        counts = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
        for condition in CONDITIONS:
            data = {
                s: cached(model, *flows(model, args, s, n, condition), f"{condition} {s}")
                for s, n in counts.items()
            }
            results[condition] = []
            for seed in range(args.seeds):
                row = next(r for r in demo_rows(args.epochs, seed) if r.name.startswith("(c)"))
                run = Path(tmp) / f"{len(results)}_{seed}"
                train_heads(data["train"], data["val"], row.train, run, progress=False, tensorboard=False)
                classifier, _ = load_heads(run)
                probs = predict_proba(classifier, data["test"])
                results[condition].append(score(probs, data["test"].labels, 4)["mean_class_acc"])
            print(f"{condition}: {results[condition]}", flush=True)
    lines = ["| AM-flow map heads, fresh tiny AM/2 (test mean class accuracy, %) | mean ± std | per seed |",
             "|---|---:|---|"]  # fmt: skip
    for condition, accs in results.items():
        each = ", ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(f"| {condition} | {100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f} | {each} |")
    seconds = time.perf_counter() - started
    lines.append(f"\nchance: 25%; {args.seeds} seeds; {seconds / 60:.1f} min")
    table = "\n".join(lines)
    args.results.mkdir(parents=True, exist_ok=True)
    result = {"results": results, "clips_per_class": counts, "size": args.size, "frames": args.frames,
              "seconds": seconds}  # fmt: skip
    (args.results / "aligner_oracle.json").write_text(json.dumps(result, indent=1))
    (args.results / "aligner_oracle.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

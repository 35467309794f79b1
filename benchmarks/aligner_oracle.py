"""What a perfect aligner could give (issue 22): the demo's AM-flow map heads (row c, stage 2) trained on
the AM flow of the fresh tiny model when the generator's true camera motion is undone in the pixels.

Same clips and model as ``benchmarks/aligner_panning.py`` (32 px, 4 frames, AM/2 = blocks 1 and 12,
seed-0 data): for each condition the AM flow of every clip is computed in memory, then the demo's row (c)
heads are trained (``stage2_temporal.training.train.train_heads``) per seed and scored on the test split:

- ``static``: static camera, frames as they are (the reference);
- ``panning, raw``: panning camera, no alignment (the aligner's starting point);
- ``panning, pairwise true shift undone``: for the flow of pair (t, t+1), frame t+1 rolled back by the
  camera's move ``camera[t+1] - camera[t]`` rounded to whole pixels (``alignment.undo_camera``);
- ``panning, pairwise exact``: the same pair with frame t+1 filmed by frame t's camera (the generator
  re-renders the scene: no rounding, no resampling): what a perfect aligning encoder in paper 000's
  design (frame t+1 aligned to frame t) would produce;
- ``panning, all frames to frame 1 exact``: every frame filmed by frame 1's camera (a perfectly
  stabilised clip: one reference for the whole clip);
- ``panning, all frames undone to frame 1 (rolled)``: the same with rounded rolls.

- ``panning, aligner trained on the true shift (pairwise | to frame 1)``: the aligning encoders
  themselves (paper 000's design, ``aligner_reference`` previous or first), trained on their own against
  the generator's answer: the loss is the squared distance of the aligned frame t+1's normed tokens to
  those of frame t+1 filmed with the reference frame's camera (a target no real video has: this asks
  whether the aligner *can* align, apart from whether the classification loss teaches it to). Their token
  distances (``alignment.measure_alignment``: before, aligned, true shift) are written beside.

Besides accuracy it writes each condition's confusion matrix (summed over seeds): under the pairwise
conditions each flow map sits in its own frame's coordinates and |s_t - s_t+1| has no sign, so the
direction of the motion (left vs right, up vs down) can only be read from how the maps move from pair
to pair, and under a panning camera that movement is the object's plus the camera's.

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
    "panning, pairwise exact",
    "panning, all frames to frame 1 exact",
    "panning, all frames undone to frame 1 (rolled)",
    "panning, aligner trained on the true shift (pairwise)",
    "panning, aligner trained on the true shift (to frame 1)",
)
SUPERVISED = {CONDITIONS[-2]: "previous", CONDITIONS[-1]: "first"}


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
    p.add_argument("--aligner-steps", type=int, default=1500, help="steps of the supervised aligners")
    p.add_argument(
        "--aligner-lr", default="1e-3", help="the supervised aligners' rate (a list with --supervised-only)"
    )
    p.add_argument(
        "--supervised-only", action="store_true", help="only train the supervised aligners at each rate"
    )
    p.add_argument(
        "--aligner-position",
        default="none",
        choices=("none", "sincos"),
        help="the supervised aligners' own position embedding (model.aligner_position)",
    )
    p.add_argument("--quick", action="store_true", help="toy sizes for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.train_per_class, args.val_per_class, args.test_per_class, args.epochs = 1, 2, 1, 1, 3
        args.aligner_steps = 3
    args.aligner_lrs = [float(v) for v in args.aligner_lr.split(",")]
    return args


def held_camera(args: argparse.Namespace, split: str, motion: str, k: int, offset: np.ndarray) -> np.ndarray:
    """Panning clip k of ``motion`` in ``split`` filmed with its camera held at ``offset`` (y, x) in every
    frame, uint8 (T, H, W, 3): the generator renders the scene again (no rounding, no resampling)."""
    from stage1_extract.videos.synthetic import render_motion_clip, split_clip_rng

    rng = split_clip_rng(0, split, motion, k)
    camera = np.tile(offset, (args.frames, 1))
    return render_motion_clip(
        motion, size=args.size, num_frames=args.frames, rng=rng, pan=True, camera=camera
    ).frames


def flows(model, args: argparse.Namespace, split: str, n: int, condition: str):
    """AM flow (clips, 1 view, blocks, T, h, N) of the split's clips under ``condition``, and labels."""
    from stage1_extract.families.backbone import normalise_video, pixel_stats
    from stage1_extract.methods.alignment import undo_camera
    from stage1_extract.videos.synthetic import render_motion_clip, split_clip_rng
    from stage2_temporal.demo import MOTIONS

    mean, std = pixel_stats(model.vit)

    def as_video(frames: np.ndarray) -> torch.Tensor:  # uint8 (T, H, W, 3) -> normalised (1, T, 3, H, W)
        return normalise_video(torch.from_numpy(frames).permute(0, 3, 1, 2)[None], mean, std)

    maps, labels = [], []
    for label, motion in enumerate(MOTIONS):
        for k in range(n):
            rng = split_clip_rng(0, split, motion, k)
            pan = condition != "static"
            clip = render_motion_clip(motion, size=args.size, num_frames=args.frames, rng=rng, pan=pan)
            video = as_video(clip.frames)
            with torch.no_grad():
                if condition == "panning, pairwise true shift undone":
                    pair_flow = model.extract(undo_camera(video, clip.camera[None])[0]).flow[:, :, 0]
                    flow = torch.cat([pair_flow, pair_flow[-1:]]).transpose(0, 1)[None]  # last repeats
                elif condition == "panning, pairwise exact":
                    pairs = [  # frames t and t+1, both filmed with frame t's camera
                        as_video(held_camera(args, split, motion, k, clip.camera[t]))[0, t : t + 2]
                        for t in range(args.frames - 1)
                    ]
                    pair_flow = model.extract(torch.stack(pairs)).flow[:, :, 0]
                    flow = torch.cat([pair_flow, pair_flow[-1:]]).transpose(0, 1)[None]  # last repeats
                elif condition == "panning, all frames to frame 1 exact":
                    flow = model.extract(as_video(held_camera(args, split, motion, k, clip.camera[0]))).flow
                elif condition == "panning, all frames undone to frame 1 (rolled)":
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


def filmed(args: argparse.Namespace, split: str, n: int, reference: str, mean, std):
    """Normalised panning clips (B, T, 3, H, W), their camera (B, T, 2) and object masks, and frames
    2..T filmed with the reference frame's camera (frame t's or frame 1's), (B, T-1, 3, H, W)."""
    from stage1_extract.families.backbone import normalise_video
    from stage1_extract.videos.synthetic import render_motion_clip, split_clip_rng
    from stage2_temporal.demo import MOTIONS

    T = args.frames
    videos, targets, cameras, masks = [], [], [], []
    for motion in MOTIONS:
        for k in range(n):
            clip = render_motion_clip(
                motion, size=args.size, num_frames=T, rng=split_clip_rng(0, split, motion, k), pan=True
            )
            if reference == "first":
                seen = held_camera(args, split, motion, k, clip.camera[0])[1:]
            else:
                seen = np.stack(
                    [held_camera(args, split, motion, k, clip.camera[t - 1])[t] for t in range(1, T)]
                )
            videos.append(clip.frames)
            targets.append(seen)
            cameras.append(clip.camera)
            masks.append(clip.object_mask)

    def norm(frames: list[np.ndarray]) -> torch.Tensor:
        return normalise_video(torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3), mean, std)

    return norm(videos), norm(targets), np.stack(cameras), np.stack(masks)


def supervised_aligner(
    plain, args: argparse.Namespace, reference: str, overrides: list[str], counts: dict, lr: float
):
    """A copy of ``plain`` with aligning encoders (``reference``) trained against the generator's answer
    (see the module's doc), and their figures on the test clips, fresh and trained: ``measure_alignment``'s
    and ``to_target``, each block's token distance (normed patch tokens) to the exact target (frame t+1
    filmed with the reference frame's camera) of frame t+1 as it is, as aligned, and of the reference frame
    itself (what an aligner that copied its reference would score)."""
    from stage1_extract.families.backbone import pixel_stats
    from stage1_extract.methods.alignment import aligner_blocks, block_inputs, measure_alignment
    from stage2_temporal.finetuning.models import build_model, load_model_config

    model = build_model(
        load_model_config(
            MODEL,
            [
                *overrides,
                "aligning_encoder=true",
                f"aligner_reference={reference}",
                f"aligner_position={args.aligner_position}",
            ],
        )
    ).eval()
    own = {k: v for k, v in model.state_dict().items() if ".aligner." in k}
    model.load_state_dict({**own, **plain.state_dict()})  # the same backbone and adapters as ``plain``
    mean, std = pixel_stats(model.vit)
    video, target, _, _ = filmed(args, "train", counts["train"], reference, mean, std)
    B, T = video.shape[:2]
    with torch.no_grad():
        inputs = block_inputs(model, video)
        wanted = [
            x.reshape(B, T - 1, *x.shape[2:]) for x in block_inputs(model, target.flatten(0, 1)[:, None])
        ]
    blocks = [b for _, b in aligner_blocks(model)]
    prefix = model.num_prefix_tokens
    params = [p for b in blocks for p in b.aligner.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    test = filmed(args, "test", counts["test"], reference, mean, std)
    with torch.no_grad():
        test_inputs = block_inputs(model, test[0])
        test_wanted = [
            x.reshape(len(test[0]), T - 1, *x.shape[2:])
            for x in block_inputs(model, test[1].flatten(0, 1)[:, None])
        ]

    def to_target() -> dict[str, dict[str, float]]:
        out = {}
        with torch.no_grad():
            for (name, block), x, y in zip(aligner_blocks(model), test_inputs, test_wanted):
                wanted = block.norm1(y[:, :, prefix:])
                aligned = block.norm1(block.aligner(x, reference)[:, :, prefix:])
                ref = x[:, :-1] if reference == "previous" else x[:, :1].expand_as(x[:, 1:])
                out[name] = {
                    "unaligned": float((block.norm1(x[:, 1:, prefix:]) - wanted).norm(dim=-1).mean()),
                    "aligned": float((aligned - wanted).norm(dim=-1).mean()),
                    # the reference frame itself: right on the background, wrong where the object moved
                    "copy_reference": float((block.norm1(ref[:, :, prefix:]) - wanted).norm(dim=-1).mean()),
                }
        return out

    figures = {"fresh": measure_alignment(model, test[0], test[2], test[3]), "fresh_to_target": to_target()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.aligner_steps):
        batch = torch.randint(0, B, (16,), generator=generator)
        loss = 0.0
        for block, x, y in zip(blocks, inputs, wanted):
            aligned = block.norm1(block.aligner(x[batch], reference)[:, :, prefix:])
            loss = loss + (aligned - block.norm1(y[batch][:, :, prefix:])).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    figures["trained"] = measure_alignment(model, test[0], test[2], test[3])
    figures["trained_to_target"] = to_target()
    return model.eval(), figures


def supervised_only(args: argparse.Namespace, plain, overrides: list[str], counts: dict) -> dict:
    """``--supervised-only``: the supervised aligners at every ``--aligner-lr``, both references; their
    token distances to the exact target on the test clips (no heads trained)."""
    lines = [f"| supervised aligner ({args.aligner_steps} steps, AdamW, position {args.aligner_position}) "
             "| lr | block | to the exact target: unaligned | trained aligner | the reference frame |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    rows = []
    for reference in ("previous", "first"):
        for lr in args.aligner_lrs:
            started = time.perf_counter()
            _, figures = supervised_aligner(plain, args, reference, overrides, counts, lr)
            for block, f in figures["trained_to_target"].items():
                rows.append({"reference": reference, "lr": lr, "block": block, **f})
                cells = f"{f['unaligned']:.3f} | {f['aligned']:.3f} | {f['copy_reference']:.3f}"
                lines.append(f"| {reference} | {lr:g} | {block} | {cells} |")
            print(lines[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    table = "\n".join(lines)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "aligner_supervised.md").write_text(table + "\n")
    (args.results / "aligner_supervised.json").write_text(
        json.dumps({"rows": rows, "steps": args.aligner_steps, "aligner_position": args.aligner_position})
    )
    print(table)
    return {"rows": rows}


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
    from stage2_temporal.demo import MOTIONS, demo_rows, deterministic_torch
    from stage2_temporal.finetuning.models import build_model, load_model_config
    from stage2_temporal.training.run_dir import load_heads
    from stage2_temporal.training.train import predict_proba, score, train_heads

    started = time.perf_counter()
    warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
    overrides = [f"num_frames={args.frames}", f"backbone.img_size={args.size}", "blocks=[1,12]"]
    if args.quick:
        overrides += ["backbone.timm_kwargs.depth=2", "blocks=[1,2]", "bottleneck=16"]
    from sklearn.metrics import confusion_matrix

    results: dict[str, list[float]] = {}
    confusion: dict[str, np.ndarray] = {}
    alignment: dict[str, dict] = {}
    with deterministic_torch(1), tempfile.TemporaryDirectory() as tmp:
        plain = build_model(load_model_config(MODEL, overrides)).eval()
        counts = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
        if args.supervised_only:
            return supervised_only(args, plain, overrides, counts)
        for condition in CONDITIONS:
            model, source = plain, condition
            if condition in SUPERVISED:
                model, alignment[condition] = supervised_aligner(
                    plain, args, SUPERVISED[condition], overrides, counts, args.aligner_lrs[0]
                )
                source = "panning, raw"  # the panning clips as they are, through the trained aligners
            data = {
                s: cached(model, *flows(model, args, s, n, source), f"{condition} {s}")
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
                matrix = confusion_matrix(data["test"].labels, probs.argmax(1), labels=range(len(MOTIONS)))
                confusion[condition] = confusion.get(condition, 0) + matrix
            print(f"{condition}: {results[condition]}", flush=True)
    axis = np.array([{"left": 0, "right": 0}.get(m, 1) for m in MOTIONS])  # horizontal 0, vertical 1
    lines = ["| AM-flow map heads, fresh tiny AM/2 (test mean class accuracy, %) | mean ± std | per seed "
             "| right axis (h/v), % |", "|---|---:|---|---:|"]  # fmt: skip
    for condition, accs in results.items():
        each = ", ".join(f"{100 * a:.1f}" for a in accs)
        matrix = confusion[condition]
        on_axis = matrix[axis[:, None] == axis[None, :]].sum() / matrix.sum()
        spread = f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f}"
        lines.append(f"| {condition} | {spread} | {each} | {100 * on_axis:.1f} |")
    lines.append(f"\nConfusion matrices (rows: true, columns: predicted; {', '.join(MOTIONS)}; all seeds):\n")
    for condition, matrix in confusion.items():
        lines.append(f"- {condition}: {matrix.tolist()}")
    lines += [
        "",
        "| supervised aligner (test clips) | state | block | token distance to the reference: before "
        "| aligned | true shift | background/object flow: bypassed | aligned |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for condition, states in alignment.items():
        for state in ("fresh", "trained"):
            blocks = states[state]
            for block, f in blocks.items():
                cells = [
                    f[k]
                    for k in (
                        "before",
                        "aligned",
                        "true_shift",
                        "flow_background_over_object_bypassed",
                        "flow_background_over_object_aligned",
                    )
                ]
                lines.append(
                    f"| {condition.split('(')[-1].rstrip(')')} | {state} | {block} | "
                    + " | ".join(f"{c:.3f}" for c in cells)
                    + " |"
                )
    seconds = time.perf_counter() - started
    lines.append(f"\nchance: 25%; {args.seeds} seeds; {seconds / 60:.1f} min")
    table = "\n".join(lines)
    args.results.mkdir(parents=True, exist_ok=True)
    result = {"results": results, "confusion": {c: m.tolist() for c, m in confusion.items()},
              "alignment": alignment, "classes": list(MOTIONS), "clips_per_class": counts,
              "size": args.size, "frames": args.frames, "seconds": seconds}  # fmt: skip
    (args.results / "aligner_oracle.json").write_text(json.dumps(result, indent=1))
    (args.results / "aligner_oracle.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

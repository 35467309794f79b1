"""Stage-1 throughput: ``amflow extract`` end to end against its two parts measured alone, in one run.

On a generated ``folder`` dataset (real mp4 files), prints clips/s of
  - end to end: ``plan_extraction`` + ``run_extraction`` (decoding in DataLoader workers, model, store);
  - model alone: the same forward (``_forward``: normalise, model, features to numpy) on pre-decoded
    batches of the same size;
  - decoding alone: the same ``VideoClipDataset`` through one DataLoader with the same workers;
and the ratio end-to-end / min(decode, model), how close the pipeline gets to its own bottleneck (target
>= 0.8). Decoding and a CPU model compete for the same cores, so on a CPU run the bound the two can reach
together, 1 / (1/decode + 1/model), is printed as well. A breakdown (model loading, worker start-up and
first batch, store writes) shows where the rest of the end-to-end time goes. Example:

    python benchmarks/extract_throughput.py                                # tiny model, 64 clips, CPU
    python benchmarks/extract_throughput.py --clips 256 --size 112 --decode-workers 4 --device cuda
    python benchmarks/extract_throughput.py backbone.timm_kwargs.depth=1   # a model as fast as decoding
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import stage1_extract  # noqa: F401  (before timm)
from foundation.devices import resolve_device
from stage1_extract.extraction.extract import (
    ExtractionPlan,
    ExtractOptions,
    _forward,
    load_extraction_model,
    plan_extraction,
    run_extraction,
)
from stage1_extract.families.backbone import RANDOM_INIT_WARNING
from stage1_extract.methods.models import feature_config_from_dict
from stage1_extract.videos.datasets import ClipRecord, DatasetConfig
from stage1_extract.videos.decode_plan import resolve_decode_device
from stage1_extract.videos.synthetic import make_folder_dataset
from stage1_extract.videos.video import VideoClipDataset, collate_clips
from store.feature_store import FeatureStore

MOTIONS = ("left", "right", "up", "down")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/models/amflow_tiny.yaml", help="model YAML (kind: amflow)")
    p.add_argument("--clips", type=int, default=64, help="clips in the generated dataset (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward (default 8)")
    p.add_argument("--decode-workers", type=int, default=2, help="DataLoader decoding processes (default 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda ...")
    p.add_argument("--size", type=int, default=96, help="generated video side in pixels (default 96)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip (default 16)")
    p.add_argument("--video-frames", type=int, default=48, help="frames per generated video (default 48)")
    p.add_argument("--shard-clips", type=int, default=None, help="clips per store shard (default: automatic)")
    p.add_argument("--flow", action="store_true", help="also store the AM-flow maps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder, kept (default: a temp one)")
    p.add_argument(
        "--video-root",
        type=Path,
        default=None,
        help="an existing folder dataset (ROOT/train/<class>/*.mp4) instead of generated videos",
    )
    p.add_argument("--decode-device", default="cpu", help="cpu, or cuda (NVDEC where it works)")
    p.add_argument("--compile", action="store_true", help="torch.compile the frozen forward")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (data./model. prefixes or a bare key), e.g. seed=1",
    )
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict:
    """Runs the four measurements; returns their figures (``main`` prints them as a table)."""
    device = resolve_device(args.device)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="extract_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)
    root = args.video_root or scratch / "videos"
    try:
        per_class = -(-args.clips // len(MOTIONS))
        wanted = {"clips": per_class, "size": args.size, "video_frames": args.video_frames}
        marker = scratch / "videos.json"  # a --dir kept from an earlier run is reused when it fits
        if args.video_root is None and (not marker.is_file() or json.loads(marker.read_text()) != wanted):
            shutil.rmtree(root, ignore_errors=True)
            t = time.perf_counter()
            make_folder_dataset(root, MOTIONS, {"train": per_class}, args.size, args.video_frames, seed=0)
            marker.write_text(json.dumps(wanted))
            print(f"generated {per_class * len(MOTIONS)} videos in {time.perf_counter() - t:.1f} s")
        options = ExtractOptions(
            batch_size=args.batch_size,
            decode_workers=args.decode_workers,
            device=str(device),
            store_flow=args.flow,
            shard_clips=args.shard_clips,
            decode_device=args.decode_device,
            compile=args.compile,
        )

        def plan_store(path: Path) -> tuple[ExtractionPlan, FeatureStore]:
            overrides = [f"num_frames={args.frames}", *args.overrides]
            return plan_extraction(
                "folder", root, "train", args.config, path, overrides=overrides, options=options
            )

        # ---- end to end, as `amflow extract` runs it (model loading included: a user waits for it too)
        out = scratch / "bench.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        plan, store = plan_store(out)
        plan_seconds = time.perf_counter() - t
        summary = run_extraction(plan, store)
        n = summary.processed
        if summary.failed:
            raise SystemExit(f"{summary.failed} clips failed to decode: the benchmark needs all of them")
        e2e = n / summary.seconds

        # ---- decoding alone: one DataLoader over every clip, the same workers and batch size
        data_cfg = DatasetConfig(**plan.dataset_config)
        records = [ClipRecord(*r) for r in plan.records]
        decode_device = resolve_decode_device(args.decode_device, Path(plan.root) / records[0].path)
        dataset = VideoClipDataset(
            records, plan.root, plan.geometry, train=False, decode_device=decode_device
        )
        t = time.perf_counter()
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            num_workers=args.decode_workers,
            collate_fn=collate_clips,
            pin_memory=device.type == "cuda",
            multiprocessing_context="spawn" if decode_device == "cuda" and args.decode_workers else None,
        )
        batches, first_batch = [], None
        for batch in loader:
            if first_batch is None:
                first_batch = time.perf_counter() - t
            batches.append(batch["video"])
        decode_seconds = time.perf_counter() - t
        decode = n / decode_seconds
        steady_decode = (n - len(batches[0])) / max(decode_seconds - first_batch, 1e-9)

        # ---- model alone on the pre-decoded batches (loaded and warmed up first)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
            model_cfg = feature_config_from_dict(plan.model_config)
            model = load_extraction_model(model_cfg, plan.checkpoint, device)
        load_seconds = time.perf_counter() - t
        mean = torch.tensor(model.vit.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)), device=device)
        std = torch.tensor(model.vit.pretrained_cfg.get("std", (0.229, 0.224, 0.225)), device=device)
        mean, std = mean.view(3, 1, 1), std.view(3, 1, 1)
        on_cuda = device.type == "cuda"
        _forward(model, batches[0], mean, std, str(device), on_cuda, args.flow)
        sync(device)
        t = time.perf_counter()
        features = [_forward(model, b, mean, std, str(device), on_cuda, args.flow) for b in batches]
        sync(device)
        model_seconds = time.perf_counter() - t
        model_rate = n / model_seconds

        # ---- store writes alone: the same features into a fresh store of the same layout
        out2 = scratch / "writes.zarr"
        shutil.rmtree(out2, ignore_errors=True)
        _, store2 = plan_store(out2)
        t = time.perf_counter()
        flat = [(f, j) for f in features for j in range(len(f["cls"]))]
        for shard in store2.pending_shards():
            with store2.shard_writer(shard) as writer:
                for i in writer.pending():
                    f, j = flat[int(i)]
                    writer.put(
                        int(i),
                        embeddings=f["embeddings"][j],
                        cls=f["cls"][j],
                        flow=f["flow"][j] if args.flow else None,
                    )
        write_seconds = time.perf_counter() - t
        num_shards = FeatureStore.open(out).num_shards
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    return {
        "clips": n, "e2e": e2e, "e2e_seconds": summary.seconds, "model": model_rate,
        "model_seconds": model_seconds, "decode": decode, "decode_seconds": decode_seconds,
        "steady_decode": steady_decode, "first_batch": first_batch, "plan_seconds": plan_seconds,
        "load_seconds": load_seconds, "write_seconds": write_seconds, "num_shards": num_shards,
        "crop_size": data_cfg.crop_size, "backbone": plan.model_config["backbone"]["name"],
        "device": str(device), "threads": torch.get_num_threads(),
    }  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args)
    e2e, decode, model_rate = r["e2e"], r["decode"], r["model"]
    bottleneck = min(decode, model_rate)
    shared = 1 / (1 / decode + 1 / model_rate)
    print(
        f"\n{r['clips']} clips, {args.size} px videos of {args.video_frames} frames -> {args.frames} "
        f"frames at {r['crop_size']} px, {r['backbone']} ({args.config}), batch "
        f"{args.batch_size}, {args.decode_workers} decode workers, {r['device']}, torch threads "
        f"{r['threads']}, {r['num_shards']} store shard(s)"
    )
    print(f"{'':<40}{'clips/s':>10}{'seconds':>10}")
    for name, rate, seconds in (
        ("end to end (amflow extract)", e2e, r["e2e_seconds"]),
        ("model alone (pre-decoded batches)", model_rate, r["model_seconds"]),
        ("decoding alone (DataLoader)", decode, r["decode_seconds"]),
        ("  decoding after the first batch", r["steady_decode"], r["decode_seconds"] - r["first_batch"]),
    ):
        print(f"{name:<40}{rate:>10.1f}{seconds:>10.2f}")
    print(f"ratio end to end / min(decode, model)      {e2e / bottleneck:.2f}   (target >= 0.8)")
    if r["device"] == "cpu":
        print(
            f"ratio end to end / shared-CPU bound        {e2e / shared:.2f}   (1/(1/decode + 1/model) = "
            f"{shared:.1f} clips/s: decoding and the model share the cores)"
        )
    print("breakdown (each measured alone):")
    for name, seconds in (
        ("planning (index, config, empty store)", r["plan_seconds"]),
        ("model loading", r["load_seconds"]),
        ("worker start-up + first batch decoded", r["first_batch"]),
        ("store writes + commits", r["write_seconds"]),
    ):
        print(f"  {name:<42}{seconds:>8.2f} s")


if __name__ == "__main__":
    main()

"""Decoding throughput on Kinetics-like videos: clips/s per CPU core, before and after the planned decoder.

Generates K400-like files (``synthetic_k400``: H.264 340x256, 10 s at 30 fps, x264 medium with B-frames,
a keyframe every ``--gop`` frames) and decodes every clip with each path, interleaved, in this process:
  - before: decord's seeking reader (``video.decord_frames``, as extraction decoded until now);
  - after: the planned PyAV pass (``video.planned_frames``: the same frames, fewer decoded);
  - every frame: PyAV decoding the whole file in order, for reference;
  - NVDEC (``--decode-device cuda``, on a GPU machine): the planned pass decoding on the GPU.
Per core = clips / process CPU seconds (robust to other jobs on shared cores; decoder threads count).
Views: 8 uniformly sampled frames (1 view), K400's test views (dense 8x16, 3 crops), 3 clips x 3 crops.

    python benchmarks/decode_throughput.py                        # 8 videos, 3 repeats
    python benchmarks/decode_throughput.py --videos 16 --gop 100 --dir /tmp/k400_like
    python benchmarks/decode_throughput.py --decode-device cuda   # GPU machine: NVDEC row too
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

import stage1_extract  # noqa: F401  (before timm)
from stage1_extract.videos import video
from stage1_extract.videos.datasets import DatasetConfig
from stage1_extract.videos.decode_plan import resolve_decode_device
from stage1_extract.videos.sampling import clip_indices
from stage1_extract.videos.synthetic_k400 import write_k400_like_video

VIEWS = {
    "8 frames, 1 view": DatasetConfig(num_frames=8, sampling="uniform", num_clips=1, num_crops=1),
    "K400 views: dense 8x16, 3 crops": DatasetConfig(
        num_frames=8, sampling="dense", frame_interval=16, num_clips=1, num_crops=3
    ),  # fmt: skip
    "8 frames x 3 clips x 3 crops": DatasetConfig(num_frames=8, sampling="uniform", num_clips=3, num_crops=3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8, help="generated videos (default 8)")
    p.add_argument("--seconds", type=float, default=10.0, help="video length (default 10 s at 30 fps)")
    p.add_argument("--size", default="256x340", help="HxW of the videos (default 256x340)")
    p.add_argument("--gop", type=int, default=100, help="keyframe interval in frames (default 100)")
    p.add_argument("--crop", type=int, default=224, help="model input size (short side resized to it)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the videos per path (default 3)")
    p.add_argument("--threads", type=int, default=1, help="decoder threads of the planned pass")
    p.add_argument("--decode-device", default="cpu", help="cpu, or cuda to add the NVDEC row")
    p.add_argument("--dir", type=Path, default=None, help="video folder, kept and reused")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return p.parse_args(argv)


def make_videos(folder: Path, count: int, size: tuple[int, int], seconds: float, gop: int) -> list[Path]:
    """K400-like videos in ``folder`` (reused when a earlier run wrote the same ones)."""
    wanted = {"count": count, "size": list(size), "seconds": seconds, "gop": gop}
    marker = folder / "videos.json"
    paths = [folder / f"k400_like_{i:03d}.mp4" for i in range(count)]
    if marker.is_file() and json.loads(marker.read_text()) == wanted and all(p.is_file() for p in paths):
        return paths
    start = time.perf_counter()
    for i, path in enumerate(paths):
        write_k400_like_video(path, seed=i, size=size, seconds=seconds, gop=gop)
    marker.write_text(json.dumps(wanted))
    print(f"generated {count} videos in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return paths


def decode_every_frame(path: Path, threads: int) -> int:
    """Decodes every frame of ``path`` in order (no conversion); returns the count."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = threads
        return sum(1 for _ in container.decode(stream))


def measure(
    paths: list[Path], crop: int, repeats: int, threads: int = 1, decode_device: str = "cpu"
) -> list[dict]:
    """Rows (views, path, clips/s per core, wall clips/s) for every view layout and decoding path."""
    hwaccel = "cuda" if resolve_decode_device(decode_device, paths[0]) == "cuda" else None
    rows = []
    for views, cfg in VIEWS.items():

        def index_for(n: int, cfg: DatasetConfig = cfg) -> np.ndarray:
            return clip_indices(n, cfg, train=False)

        runs: dict[str, Callable[[Path], object]] = {
            "before: decord seeks": lambda p: video.decord_frames(p, crop, index_for),
            "after: planned PyAV pass": lambda p: video.planned_frames(p, crop, index_for, threads),
            "every frame in order (PyAV)": lambda p: decode_every_frame(p, threads),
        }
        if hwaccel:
            runs["after, NVDEC: planned pass"] = lambda p: video.planned_frames(
                p, crop, index_for, 1, hwaccel
            )
        cpu = {k: [] for k in runs}
        wall = {k: [] for k in runs}
        for fn in runs.values():  # warm-up: libraries, page cache
            fn(paths[0])
        for _ in range(repeats):
            for path in paths:
                for name, fn in runs.items():  # interleaved: load drifts hit every path alike
                    c, w = time.process_time(), time.perf_counter()
                    fn(path)
                    cpu[name].append(time.process_time() - c)
                    wall[name].append(time.perf_counter() - w)
        for name in runs:
            rows.append({
                "views": views,
                "path": name,
                "ms_cpu_per_clip": 1e3 * statistics.median(cpu[name]),
                "clips_per_s_per_core": len(cpu[name]) / sum(cpu[name]),
                "clips_per_s_wall": len(wall[name]) / sum(wall[name]),
            })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a text table, with each layout's after/before ratio."""
    lines = [f"{'views':<34}{'path':<30}{'ms CPU/clip':>12}{'clips/s/core':>14}{'clips/s wall':>14}"]
    for r in rows:
        lines.append(
            f"{r['views']:<34}{r['path']:<30}{r['ms_cpu_per_clip']:>12.1f}"
            f"{r['clips_per_s_per_core']:>14.1f}{r['clips_per_s_wall']:>14.1f}"
        )
    for views in VIEWS:
        by = {r["path"]: r["clips_per_s_per_core"] for r in rows if r["views"] == views}
        ratio = by["after: planned PyAV pass"] / by["before: decord seeks"]
        lines.append(f"{views:<34}after / before per core: {ratio:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    folder = args.dir or Path(tempfile.gettempdir()) / "k400_like_videos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = make_videos(folder, args.videos, size, args.seconds, args.gop)
    rows = measure(paths, args.crop, args.repeats, args.threads, args.decode_device)
    kbps = 8 * sum(p.stat().st_size for p in paths) / len(paths) / args.seconds / 1000
    print(
        f"\n{len(paths)} K400-like videos ({size[0]}x{size[1]}, {args.seconds:g} s at 30 fps, keyframe every "
        f"{args.gop}, x264 medium, ~{kbps:.0f} kbit/s) -> {args.crop} px short side, {args.repeats} passes, "
        f"decoder threads {args.threads}, PyAV {av.__version__}"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

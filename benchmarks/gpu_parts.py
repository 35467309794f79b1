"""The parts of ``gpu_check.py``: what is measured, at GPU size or at the CPU smoke's tiny size.

Each part returns markdown lines (tables of figures); ``gpu_check.run_part`` times it, catches its
failure and writes the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import stage1_extract  # noqa: F401  (before timm)

# isort: split
import amflow_overhead
import decode_throughput
import extract_throughput
import finetune_memory
import sweep_speed
import zeroi2v_latency

REPO = Path(__file__).resolve().parents[1]


class PartFailed(Exception):
    """A part that failed but has figures to report (e.g. which tests failed)."""

    def __init__(self, message: str, lines: list[str]) -> None:
        super().__init__(message)
        self.lines = lines


# Dense bf16 tensor-core peak (no sparsity), by device-name substring, most specific first (vendor sheets).
BF16_DENSE_PEAK = (
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


@dataclasses.dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke: models, data sizes, repeats."""

    device: str
    am12: str = "configs/models/amflow_vitb14_dinov2_am12_lstm.yaml"
    am2: str = "configs/models/amflow_vitb14_dinov2_am2_lstm.yaml"
    model_overrides: tuple[str, ...] = ()
    am2_overrides: tuple[str, ...] = ()
    clips: int = 8  # clips of 8 frames per extraction forward
    mfu_frames: tuple[int, ...] = (64, 128, 256)
    repeats: int = 10
    compile: bool = True
    decode_videos: int = 16
    decode_size: tuple[int, int] = (256, 340)
    decode_seconds: float = 10.0
    decode_crop: int = 224
    decode_repeats: int = 2
    extract_clips: int = 256
    extract_workers: int = 12
    zeroi2v: tuple[str, int, int] = ("vit_base_patch16_clip_224", 224, 50)  # model, img size, repeats
    finetune: tuple[str, ...] = (
        "configs/models/zeroi2v_vitb16_clip_k400_8f.yaml",
        "configs/models/amflow_vitb14_dinov2_am2_lstm.yaml",
    )
    finetune_batch: int = 8
    finetune_steps: tuple[int, int] = (2, 5)  # warm-up, timed
    stage2: tuple[int, int, int, int] = (16115, 24, 768, 768)  # clips, adapters, dim, LSTM hidden
    part_limit_s: int = 150
    tests_limit_s: int = 240


def smoke_sizes() -> Sizes:
    return Sizes(
        device="cpu",
        am12="configs/models/amflow_tiny.yaml",
        am2="configs/models/amflow_tiny.yaml",
        model_overrides=("backbone.timm_kwargs.depth=2", "bottleneck=32"),
        am2_overrides=("blocks=[1,2]",),
        clips=1,
        mfu_frames=(8, 16),
        repeats=2,
        compile=False,
        decode_videos=2,
        decode_size=(64, 86),
        decode_seconds=1.0,
        decode_crop=32,
        decode_repeats=1,
        extract_clips=8,
        extract_workers=1,
        zeroi2v=("vit_tiny_patch16_224", 32, 2),
        finetune=("configs/models/zeroi2v_tiny.yaml", "configs/models/amflow_tiny.yaml"),
        finetune_batch=2,
        finetune_steps=(1, 1),
        stage2=(64, 2, 32, 32),
        part_limit_s=60,
        tests_limit_s=90,
    )


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table; floats with 3 significant digits."""

    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows),
    ]


# --------------------------------------------------------------------------------------------- parts


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_DENSE_PEAK:
        if key.lower() in device_name.lower():
            return peak
    return None


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"


def part_env(sizes: Sizes) -> list[str]:
    import av
    import dask
    import decord
    import timm
    import zarr

    rows = [
        ["device", device_name(sizes.device)],
        ["torch", torch.__version__],
        ["CUDA (torch built with)", torch.version.cuda or "none"],
        ["cuDNN", str(torch.backends.cudnn.version())],
        ["GPUs", torch.cuda.device_count()],
        ["bf16 dense peak used for MFU", _peak_text(sizes)],
        ["timm / av / decord / zarr / dask",
         " / ".join(m.__version__ for m in (timm, av, decord, zarr, dask))],
        ["Python", platform.python_version()],
        ["CPU cores", os.cpu_count()],
    ]  # fmt: skip
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        rows.append(
            ["GPU memory", f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"]
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            rows.append(["driver, max SM clock", smi.stdout.strip()])
    return table(["what", "value"], rows)


def _peak_text(sizes: Sizes) -> str:
    peak = bf16_peak(device_name(sizes.device)) if sizes.device == "cuda" else None
    return f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (MFU not computed)"


def part_cuda_tests(sizes: Sizes) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=sizes.tests_limit_s, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    skipped = [ln for ln in lines if ln.startswith("SKIPPED")]
    out = [f"`{' '.join(cmd[2:])}` exit {proc.returncode}: **{summary.strip('= ')}**", ""]
    out += [f"- {ln[:300]}" for ln in failed + skipped]
    if proc.returncode not in (0, 5) and not failed:  # 5: nothing collected
        out += ["```", *proc.stdout.splitlines()[-15:], *proc.stderr.splitlines()[-5:], "```"]
    if proc.returncode not in (0, 5):
        raise PartFailed(f"pytest -m cuda: {summary.strip('= ')}", out)
    return out


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


def count_flops(fn: Callable[[], object]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _am_vs_plain(label: str, config: str, overrides: list[str], sizes: Sizes, peak: float | None):
    """Table rows, a ratio line and the plain model: AM-flow extraction vs timm's forward, same frames."""
    device = sizes.device
    cfg, model, plain = amflow_overhead.build_pair(config, overrides, device)
    size = cfg.backbone.img_size or 224
    g = torch.Generator(device=device).manual_seed(0)
    video = torch.randn(sizes.clips, cfg.num_frames, 3, size, size, device=device, generator=g)
    frames = video.flatten(0, 1)
    runs = {"plain": lambda: plain.forward_features(frames), "am": lambda: model.extract(video)}
    times = amflow_overhead.interleaved_times(runs, sizes.repeats, _sync(device), _autocast(device))
    flops = {k: count_flops(fn) for k, fn in runs.items()}
    ratio = statistics.median(a / p for a, p in zip(times["am"], times["plain"]))
    flop_ratio = flops["am"] / flops["plain"]
    rows = []
    for name, key in (("timm forward_features", "plain"), (f"{label} extract", "am")):
        t, f, n = statistics.median(times[key]), flops[key], len(frames)
        mfu = f"{f / t / peak:.1%}" if peak else "n/a"
        rows.append([f"{name} ({cfg.backbone.name}, {n} frames)", n / t, sizes.clips / t, 1e3 * t, f / 1e9,
                     f / t / 1e12, mfu])  # fmt: skip
    line = (
        f"- {label}: time ratio to timm **{ratio:.3f}**, FLOP ratio {flop_ratio:.3f}, time ratio / FLOP "
        f"ratio **{ratio / flop_ratio:.3f}** (target <= 1.05)"
    )
    return rows, line, plain


def part_backbone(sizes: Sizes) -> list[str]:
    device, sync = sizes.device, _sync(sizes.device)
    peak = bf16_peak(device_name(device)) if device == "cuda" else None
    rows, extra = [], []
    for label, config, more in (("AM/12", sizes.am12, ()), ("AM/2(1,12)", sizes.am2, sizes.am2_overrides)):
        r, line, plain = _am_vs_plain(label, config, [*sizes.model_overrides, *more], sizes, peak)
        rows += r
        extra.append(line)
    out = table(["forward (bf16 on CUDA)", "frames/s", "clips/s", "ms", "GFLOP", "TFLOP/s", "MFU"], rows)
    out += ["", *extra, ""]
    # MFU of the plain forward against the batch (frames), to see where the GPU fills
    size = plain.patch_embed.img_size[0]
    mfu_rows = []
    for n in sizes.mfu_frames:
        frames = torch.randn(n, 3, size, size, device=device)
        fn = lambda frames=frames: plain.forward_features(frames)  # noqa: E731
        t = statistics.median(amflow_overhead.interleaved_times({"p": fn}, sizes.repeats, sync,
                                                                _autocast(device))["p"])  # fmt: skip
        f = count_flops(fn)
        mfu_rows.append([n, n / t, f / t / 1e12, f"{f / t / peak:.1%}" if peak else "n/a"])
    out += table(["plain forward: frames per batch", "frames/s", "TFLOP/s", "MFU (target >= 50% at >= 64)"],
                 mfu_rows)  # fmt: skip
    return out


def part_compile(sizes: Sizes) -> list[str]:
    """AM/12 extraction compiled (``--compile``) against eager, same frames, interleaved."""
    if not sizes.compile:
        return ["- not measured in the CPU smoke (inductor compiles for minutes on 2 cores)"]
    device = sizes.device
    cfg, model, _ = amflow_overhead.build_pair(sizes.am12, list(sizes.model_overrides), device)
    size = cfg.backbone.img_size or 224
    video = torch.randn(sizes.clips, cfg.num_frames, 3, size, size, device=device)
    compiled = torch.compile(model.extract, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode(), _autocast(device):
        compiled(video)
    _sync(device)()
    compile_s = time.perf_counter() - start
    times = amflow_overhead.interleaved_times(
        {"eager": lambda: model.extract(video), "compiled": lambda: compiled(video)},
        sizes.repeats, _sync(device), _autocast(device),
    )  # fmt: skip
    ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
    return [
        f"- torch.compile AM/12 extract: compiled / eager time **{ratio:.3f}** (median "
        f"{1e3 * statistics.median(times['compiled']):.1f} vs {1e3 * statistics.median(times['eager']):.1f} "
        f"ms), first call (compilation) {compile_s:.0f} s; keep `--compile` only if the ratio is < 0.95"
    ]


def _k400_videos(folder: Path, sizes: Sizes, count: int) -> list[Path]:
    """K400-like videos, written by a process per core."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [
        (folder / f"k400_like_{i:03d}.mp4", i, sizes.decode_size, sizes.decode_seconds) for i in range(count)
    ]
    workers = max(1, min(count, (os.cpu_count() or 1)))
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # the children never touch CUDA
        return pool.starmap(_write_k400, jobs)


def _write_k400(path: Path, seed: int, size: tuple[int, int], seconds: float) -> Path:
    from stage1_extract.videos.synthetic_k400 import write_k400_like_video

    gop = max(10, round(seconds * 30 / 3))  # ~3 keyframes per clip, as the issue measured on Kinetics
    return write_k400_like_video(path, seed, size=size, seconds=seconds, gop=gop)


def part_decode(sizes: Sizes, scratch: Path) -> list[str]:
    paths = _k400_videos(scratch / "decode", sizes, sizes.decode_videos)
    rows = decode_throughput.measure(paths, sizes.decode_crop, sizes.decode_repeats, 1, sizes.device)
    out = table(
        ["views", "path", "ms CPU/clip", "clips/s per core", "clips/s wall (1 process)"],
        [[r["views"], r["path"], r["ms_cpu_per_clip"], r["clips_per_s_per_core"], r["clips_per_s_wall"]]
         for r in rows],
    )  # fmt: skip
    by = {(r["views"], r["path"]): r for r in rows}
    cores = os.cpu_count() or 1
    out.append("")
    for views in decode_throughput.VIEWS:
        before = by[(views, "before: decord seeks")]["clips_per_s_per_core"]
        after = by[(views, "after: planned PyAV pass")]["clips_per_s_per_core"]
        out.append(f"- {views}: after / before per core **{after / before:.2f}x**; {cores} cores: "
                   f"~{after * cores:.0f} clips/s (after)")  # fmt: skip
    if not any("NVDEC" in r["path"] for r in rows):
        out.append("- NVDEC: not available here (see the warning in the log); CPU rows only")
    return out


def part_extract(sizes: Sizes, scratch: Path) -> list[str]:
    root = scratch / "extract_videos"
    per_class = -(-sizes.extract_clips // len(extract_throughput.MOTIONS))
    first, *others = extract_throughput.MOTIONS
    paths = _k400_videos(root / "train" / first, sizes, per_class)
    for motion in others:  # the same files under every class: decoding costs the same
        (root / "train" / motion).mkdir(parents=True, exist_ok=True)
        for p in paths:
            os.link(p, root / "train" / motion / p.name)
    from stage1_extract.videos.decode_plan import cuda_decode_problem

    runs = [("AM/12", sizes.am12, (), "cpu"), ("AM/2(1,12)", sizes.am2, sizes.am2_overrides, "cpu")]
    nvdec = cuda_decode_problem(paths[0]) is None if sizes.device == "cuda" else False
    if nvdec:
        runs.append(("AM/12, NVDEC decoding", sizes.am12, (), "cuda"))
    rows = []
    for k, (name, config, more, decode_device) in enumerate(runs):
        argv = [
            "--config", config, "--video-root", str(root), "--batch-size", "8", "--decode-workers",
            str(sizes.extract_workers), "--device", sizes.device, "--frames", "8", "--dir",
            str(scratch / f"extract_{k}"), "--decode-device", decode_device, *sizes.model_overrides, *more,
        ]  # fmt: skip
        r = extract_throughput.measure(extract_throughput.parse_args(argv))
        rows.append(
            [
                f"{name} {r['backbone']}",
                r["clips"],
                r["e2e"],
                r["model"],
                r["decode"],
                r["decode"] / r["model"],
                r["e2e"] / r["model"],
                r["e2e"] / min(r["model"], r["decode"]),
            ]
        )
    out = table(
        ["model (K400-like videos, 8 frames, folder views)", "clips", "end to end clips/s", "model alone",
         "decoding alone", "decode / model capacity", "e2e / model", "e2e / min(decode, model)"], rows,
    )  # fmt: skip
    out.append(f"\n- decoding: {sizes.extract_workers} DataLoader workers (planned PyAV pass); NVDEC "
               f"{'measured in the last row' if nvdec else 'not available here'}")  # fmt: skip
    return out


def part_zeroi2v(sizes: Sizes) -> list[str]:
    model, img, repeats = sizes.zeroi2v
    argv = [
        "--model",
        model,
        "--img-size",
        str(img),
        "--frames",
        "8",
        "--repeats",
        str(repeats),
        "--device",
        sizes.device,
        "--dtype",
        "bf16" if sizes.device == "cuda" else "fp32",
        "--no-progress",
    ]
    t = zeroi2v_latency.measure(zeroi2v_latency.parse_args(argv))
    names = list(t["median ms"])
    rows = [[n, *(t[c][n] for c in t)] for n in names]
    out = table(["model (1 clip x 8 frames)", *t], rows)
    plain, merged, unmerged = names
    out.append(f"\n- merged / plain median **{t['median ms'][merged] / t['median ms'][plain]:.3f}** "
               f"(paper 1.006, target <= 1.03); unmerged / merged "
               f"{t['median ms'][unmerged] / t['median ms'][merged]:.3f}")  # fmt: skip
    return out


def part_finetune(sizes: Sizes) -> list[str]:
    warm, steps = sizes.finetune_steps
    args = finetune_memory.parse_args(
        [
            "--config",
            *sizes.finetune,
            "--batch-size",
            str(sizes.finetune_batch),
            "--steps",
            str(steps),
            "--warmup",
            str(warm),
            "--device",
            sizes.device,
        ]
    )
    rows = []
    for path in sizes.finetune:
        r = finetune_memory.measure(path, args, torch.device(sizes.device))
        rows.append(
            [
                Path(path).stem,
                r["batch_size"],
                r["precision"],
                f"{r['trainable_parameters'] / 1e6:.1f}M",
                r["peak_memory_gb"],
                r["memory_kind"],
                r["clips_per_second"],
                r["ms_per_step"],
            ]
        )
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    out = table(
        ["config", "batch", "precision", "trainable", "peak GB", "memory", "clips/s", "ms/step"], rows
    )
    out.append(f"\n- reference: {finetune_memory.PAPER_REFERENCE}")
    return out


def part_stage2(sizes: Sizes) -> list[str]:
    from stage2_temporal.heads import LSTMHeadsConfig
    from stage2_temporal.training.config import TrainConfig

    clips, adapters, dim, hidden = sizes.stage2
    base = sweep_speed.random_cache(min(clips, 1024), adapters=adapters, frames=8, dim=dim, classes=31)
    take = np.arange(clips) % base.num_clips  # the same random rows repeated up to the full size
    data = dataclasses.replace(base, embeddings=base.embeddings[take], cls=base.cls[take],
                               labels=base.labels[take])  # fmt: skip
    cfg = TrainConfig(heads=LSTMHeadsConfig(hidden=hidden, layers=3), batch_size=64, epochs=1,
                      warmup_epochs=0, device=sizes.device)  # fmt: skip
    seconds, steps, classifier = _cache_epoch(data, cfg)
    params = sum(p.numel() for p in classifier.parameters())
    return table(
        ["heads", "parameters", "clips", "steps (batch 64)", "epoch seconds", "clips/s"],
        [[f"{adapters} x LSTM {hidden}, 3 layers", f"{params / 1e6:.1f}M", clips, steps, seconds,
          clips / seconds]],
    )  # fmt: skip


def _cache_epoch(data, cfg):
    """One full epoch from the cache on ``cfg.device`` (sweep_speed's timing, on the given device)."""
    from stage2_temporal.training.train import heads_info, make_optimiser, train_epoch

    torch.manual_seed(0)
    classifier = heads_info(data, cfg).build().to(cfg.device)
    steps = math.ceil(data.num_clips / cfg.batch_size)
    optimiser, schedule = make_optimiser(classifier, cfg, steps)
    generator = torch.Generator().manual_seed(0)
    _sync(cfg.device)()
    start = time.perf_counter()
    train_epoch(classifier, data, optimiser, schedule, cfg, generator, cfg.device)
    _sync(cfg.device)()
    return time.perf_counter() - start, steps, classifier

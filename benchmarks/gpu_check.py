"""One run on a CUDA machine: the tests marked ``cuda`` and every GPU figure, side by side, into one report.

Parts (each in its own try/except with a time limit: a failure is recorded with its one-line error and
the next part runs; the report is rewritten after every part, so it exists even if the run is killed):
  env         device, driver, versions, the bf16 dense peak used for MFU
  cuda_tests  ``pytest -m cuda tests/test_cuda.py``
  backbone    ViT-B/14 AM/12 and AM/2(1,12) extraction (bf16, 8 frames) vs timm's plain forward on the same
              frames: frames/s, clips/s, time ratio against the FLOP ratio (``torch.utils.flop_counter``);
              the plain forward's MFU at 64..256 frames
  compile     ``torch.compile`` of the AM/12 extraction forward against eager (``--compile``)
  decode      ``decode_throughput`` on K400-like videos: clips/s per CPU core before/after, NVDEC
  extract     ``extract_throughput``: extraction end to end with decoding vs the model alone
  zeroi2v     ``zeroi2v_latency``: merged / plain ViT-B/16 (the paper: 1.006)
  finetune    ``finetune_memory``: peak memory and clips/s at batch 8, ZeroI2V ViT-B/16 and AM/2 ViT-B/14
  stage2      one epoch of the paper-size LSTM heads (24 x 3-layer LSTM 768) at Smarthome size (16,115)
Report: ``<out>/gpu-<device>-<date>.md``. About 5 minutes on an H200 (limit 8).

``--cpu-smoke`` runs the same code on the CPU with tiny models and data in under 2 minutes (the test
suite does, so the script cannot rot); its figures say nothing about a GPU.

    python benchmarks/gpu_check.py                       # on the GPU machine
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import stage1_extract  # noqa: F401  (before timm)
from stage1_extract.families.backbone import RANDOM_INIT_WARNING

# isort: split
from gpu_parts import (
    REPO,
    PartFailed,
    Sizes,
    bf16_peak,
    device_name,
    part_backbone,
    part_compile,
    part_cuda_tests,
    part_decode,
    part_env,
    part_extract,
    part_finetune,
    part_stage2,
    part_zeroi2v,
    smoke_sizes,
)

__all__ = ["PARTS", "PartFailed", "Report", "bf16_peak", "main", "run_part"]

# ------------------------------------------------------------------------------------------ the report


@dataclasses.dataclass
class Part:
    name: str
    title: str
    status: str = "not run"
    seconds: float = 0.0
    lines: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None


class Report:
    """The markdown report, rewritten (atomically) after every part."""

    def __init__(self, path: Path, header: list[str]) -> None:
        self.path, self.header, self.parts = path, header, []

    def write(self) -> None:
        out = [*self.header, ""]
        out.append("| part | status | seconds |")
        out.append("| --- | --- | --- |")
        out += [f"| {p.name} | {p.status} | {p.seconds:.1f} |" for p in self.parts]
        for p in self.parts:
            out += ["", f"## {p.name}: {p.title}", ""]
            if p.error:
                out.append(f"**{p.status}**: `{p.error}`")
                out.append("")
            out += p.lines or ["(no figures)"]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(out) + "\n")
        os.replace(tmp, self.path)


class PartTimeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise PartTimeout("the part ran past its time limit")


def run_part(report: Report, name: str, title: str, fn: Callable[[], list[str]], limit_s: int) -> None:
    """Runs one part under a time limit (SIGALRM); records its figures or its one-line error."""
    part = Part(name, title)
    report.parts.append(part)
    print(f"[gpu_check] {name}: {title}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        part.lines = fn()
        part.status = "ok"
    except Exception as e:  # every failure is a figure of the run: record it and go on
        message = (str(e).strip().splitlines() or [""])[0]
        part.error = f"{type(e).__name__}: {message}"[:300]
        part.status = "timeout" if isinstance(e, PartTimeout) else "failed"
        part.lines = getattr(e, "lines", [])  # PartFailed carries its figures
        traceback.print_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        part.seconds = time.perf_counter() - start
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report.write()


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (< 2 min): the test")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="report folder")
    p.add_argument("--parts", default=None, help="comma-separated subset of the parts (default: all)")
    p.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temp one)")
    return p.parse_args(argv)


PARTS = ("env", "cuda_tests", "backbone", "compile", "decode", "extract", "zeroi2v", "finetune", "stage2")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)
    if args.cpu_smoke:
        sizes = smoke_sizes()
    elif torch.cuda.is_available():
        sizes = Sizes(device="cuda")
    else:
        raise SystemExit("gpu_check: no CUDA device here; use --cpu-smoke for the CPU run")
    parts = args.parts.split(",") if args.parts else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"gpu_check: --parts: unknown {unknown}; expected some of {list(PARTS)}")
    name = (
        "cpu-smoke" if args.cpu_smoke else re.sub(r"[^a-z0-9]+", "-", device_name("cuda").lower()).strip("-")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{name}-{datetime.date.today().isoformat()}.md"
    started = datetime.datetime.now(datetime.timezone.utc)
    header = [
        f"# GPU check: {device_name(sizes.device)}"
        + (" (CPU smoke: tiny models, no GPU figures)" * args.cpu_smoke),
        "",
        f"`python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`, started "
        f"{started:%Y-%m-%d %H:%M} UTC; every part measured side by side in this one run.",
    ]
    report = Report(path, header)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="gpu_check_"))
    scratch.mkdir(parents=True, exist_ok=True)
    titles = {
        "env": ("device and versions", lambda: part_env(sizes)),
        "cuda_tests": ("tests marked cuda", lambda: part_cuda_tests(sizes)),
        "backbone": ("extraction forward vs timm, FLOPs and MFU", lambda: part_backbone(sizes)),
        "compile": ("torch.compile of the extraction forward", lambda: part_compile(sizes)),
        "decode": ("decoding K400-like videos", lambda: part_decode(sizes, scratch)),
        "extract": ("extraction end to end with decoding", lambda: part_extract(sizes, scratch)),
        "zeroi2v": ("ZeroI2V merged / plain latency", lambda: part_zeroi2v(sizes)),
        "finetune": ("finetuning peak memory and clips/s", lambda: part_finetune(sizes)),
        "stage2": ("stage-2 LSTM heads epoch at Smarthome size", lambda: part_stage2(sizes)),
    }
    start = time.perf_counter()
    try:
        for part in parts:
            title, fn = titles[part]
            limit = sizes.tests_limit_s + 30 if part == "cuda_tests" else sizes.part_limit_s
            run_part(report, part, title, fn, limit)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report.header.append(f"\nTotal {time.perf_counter() - start:.0f} s.")
    report.write()
    failed = [p.name for p in report.parts if p.status != "ok"]
    print(
        f"[gpu_check] report: {path}; {len(report.parts) - len(failed)} parts ok, failed: {failed or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""ZeroI2V inference latency, measured side by side: merged / plain timm ViT, and unmerged / merged.

All three models see the same clip in every repetition, in rotating order (interleaved), so drifts in
machine load hit them alike. The paper (002, Table 9) reports 28.89 ms for merged ZeroI2V ViT-B/16 vs
28.72 ms for the plain ViT-B/16 on a V100: a ratio of 1.006; our target is <= 1.03.

    python benchmarks/zeroi2v_latency.py --model vit_base_patch16_clip_224 --frames 8 --repeats 10
    python benchmarks/zeroi2v_latency.py --device cuda --dtype bf16 --repeats 50
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings

import stage1_extract  # noqa: F401  (before timm: fixes the torchvision import on this machine)

# isort: split
import timm
import torch
from tqdm import tqdm

from stage1_extract.families.backbone import RANDOM_INIT_WARNING
from stage1_extract.methods.linear_adapters import linear_adapter_modules, merge_linear_adapters
from stage2_temporal.zeroi2v.model import ZeroI2VConfig, build_zeroi2v

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_clip_224", help="timm ViT name")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--frames", type=int, default=8, help="frames of the one clip (batch = frames images)")
    p.add_argument("--head-offsets", default="-1,1", help="offsets of the first heads; the rest are spatial")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per model (after 2 warm-ups)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """Plain timm ViT, unmerged ZeroI2V (random non-zero adapters) and its merge, all with equal backbones."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)  # latency does not need weights
        plain = timm.create_model(args.model, num_classes=0, img_size=args.img_size)
        heads = plain.blocks[0].attn.num_heads
        first = [int(o) for o in args.head_offsets.split(",") if o.strip()]
        cfg = ZeroI2VConfig(num_frames=args.frames, num_classes=400)
        cfg.backbone.name, cfg.backbone.img_size = args.model, args.img_size
        cfg.backbone.head_offsets = first + [0] * (heads - len(first))
        unmerged = build_zeroi2v(cfg)
    unmerged.vit.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for layer in linear_adapter_modules(unmerged.vit):
            layer.adapter.up.weight.normal_(std=0.02)
    merged = copy.deepcopy(unmerged)
    merge_linear_adapters(merged.vit)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_merged = sum(p.numel() for p in merged.vit.parameters())
    if n_plain != n_merged:
        raise RuntimeError(f"merged ViT has {n_merged} parameters, the plain ViT {n_plain}")
    models = {"plain timm ViT": plain, "ZeroI2V merged": merged, "ZeroI2V unmerged": unmerged}
    return {k: m.to(args.device).eval() for k, m in models.items()}


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{column: {model: milliseconds}}: median and min wall time (and median CPU time on the CPU)."""
    device = torch.device(args.device)
    models = build_models(args)
    video = torch.randn(1, args.frames, 3, args.img_size, args.img_size, device=device)
    inputs = {name: video.flatten(0, 1) if name == "plain timm ViT" else video for name in models}
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[args.dtype])
        if args.dtype != "fp32"
        else contextlib.nullcontext()
    )

    def timed(name: str) -> tuple[float, float]:
        """(wall, process CPU) seconds of one forward; CPU time is robust to other jobs on shared cores."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        models[name](inputs[name])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    names = list(models)
    walls: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode(), autocast:
        for _ in range(2):
            for n in names:
                timed(n)
        for rep in tqdm(range(args.repeats), desc="interleaved repetitions", disable=not args.progress):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for n in order:
                wall, cpu = timed(n)
                walls[n].append(wall)
                cpus[n].append(cpu)

    columns = {"median ms": (walls, statistics.median), "min ms": (walls, min)}
    if device.type == "cpu":
        columns["median CPU ms"] = (cpus, statistics.median)
    return {c: {n: f(t[n]) * 1e3 for n in names} for c, (t, f) in columns.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    table = measure(args)
    names = list(next(iter(table.values())))
    print(
        f"\n{args.model} at {args.img_size} px, 1 clip x {args.frames} frames, {device.type} {args.dtype}, "
        f"{torch.get_num_threads()} threads, {args.repeats} interleaved repetitions"
    )
    print(f"{'model':<20}" + "".join(f"{c:>16}" for c in table))
    for n in names:
        print(f"{n:<20}" + "".join(f"{table[c][n]:>16.2f}" for c in table))
    plain, merged, unmerged = names
    for label, num, den in (("merged / plain", merged, plain), ("unmerged / merged", unmerged, merged)):
        ratios = "".join(f"{table[c][num] / table[c][den]:>16.3f}" for c in table)
        print(f"{label:<20}{ratios}" + ("   (target <= 1.03)" if den == plain else ""))


if __name__ == "__main__":
    main()

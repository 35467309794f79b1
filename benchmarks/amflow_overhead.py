"""AM-flow overhead: forward time of the AM/12 model / timm's plain forward, same frames, same device.

Measured side by side in one run, interleaved repetitions, median of the per-repetition ratios.
Target (issue 2): <= 1.25 on CPU for ViT-S/14 at 224 px with 8 frames (no aligning encoder).

    python benchmarks/amflow_overhead.py     # CPU, configs/models/amflow_vits14_dinov2_am12_lstm.yaml
    python benchmarks/amflow_overhead.py --device cuda --dtype bf16 --clips 8
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import stage1_extract  # noqa: F401  (before timm: fixes the torchvision import on this machine)

# isort: split
import timm
import torch

from stage1_extract.families.backbone import is_added_key
from stage2_temporal.finetuning.models import build_amflow, load_model_config


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def build_pair(config: str, overrides: list[str], device: str):
    """(cfg, AM-flow model, plain timm ViT with the same backbone weights), in eval mode on ``device``."""
    cfg = load_model_config(config, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_amflow(cfg).eval().to(device)
        b = cfg.backbone
        plain = timm.create_model(b.name, img_size=b.img_size, num_classes=0, **b.timm_kwargs)
    plain.load_state_dict({k: v for k, v in model.vit.state_dict().items() if not is_added_key(k)})
    return cfg, model, plain.eval().to(device)


def interleaved_times(runs: dict, repeats: int, sync, autocast) -> dict[str, list[float]]:
    """Seconds of each run per repetition, after one warm-up, the runs interleaved in every repetition."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode(), autocast:
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn, sync))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/models/amflow_vits14_dinov2_am12_lstm.yaml")
    p.add_argument("--clips", type=int, default=1, help="clips per forward (each of num_frames frames)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    cfg, model, plain = build_pair(args.config, ["aligning_encoder=false", *args.overrides], args.device)
    size = cfg.backbone.img_size or plain.patch_embed.img_size[0]
    video = torch.randn(args.clips, cfg.num_frames, 3, size, size, device=args.device)
    frames = video.flatten(0, 1)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    runs = {
        "timm forward_features": lambda: plain.forward_features(frames),
        "AM/12 extract (stage 1)": lambda: model.extract(video),
        "AM/12 forward (with heads)": lambda: model(video),
    }
    times = interleaved_times(runs, args.repeats, sync, autocast)
    base = times["timm forward_features"]
    print(
        f"{cfg.backbone.name} @ {size}px, {cfg.num_frames} frames x {args.clips} clip(s), "
        f"{args.device} {args.dtype}, blocks={cfg.blocks}, r={model.bottleneck}, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    for name, ts in times.items():
        ratios = [t / b0 for t, b0 in zip(ts, base)]
        median_ms = statistics.median(ts) * 1e3
        print(f"  {name:<28} median {median_ms:8.1f} ms   ratio to timm {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()

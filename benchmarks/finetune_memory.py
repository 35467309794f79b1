"""Training cost of end-to-end finetuning: peak memory at batch 8 and training clips per second.

One training step = forward, backward and AdamW update of the trainable parameters, on random normalised
clips (decoding is not measured), with bf16 autocast on CUDA as ``amflow finetune`` runs it. The paper's
reference (002, Table 10, V100 with PyTorch mixed precision): ZeroI2V ViT-B/16, 8 frames, batch 8: 7.6 GB.

    python benchmarks/finetune_memory.py --config configs/models/zeroi2v_vitb16_clip_k400_8f.yaml \\
        configs/models/amflow_vitb14_dinov2_am12_lstm.yaml --device cuda
    python benchmarks/finetune_memory.py --config configs/models/amflow_tiny.yaml --device cpu --steps 3

On the CPU the memory column is the process's peak resident set size (everything the process ever held),
not the training step's own peak as on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import stage1_extract  # noqa: F401  (before timm: fixes the torchvision import on this machine)

# isort: split
import torch
from tqdm import tqdm

from foundation.devices import resolve_device
from stage1_extract.families.backbone import normalise_video, pixel_stats
from stage2_temporal.finetuning.model import autocast, build_finetune_model, use_gradient_checkpointing
from stage2_temporal.finetuning.models import load_model_config
from stage2_temporal.training.optim import adamw

PAPER_REFERENCE = "ZeroI2V ViT-B/16 8f, batch 8, V100 AMP (paper 002, Table 10): 7.6 GB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", required=True, help="model YAML(s), kind amflow or zeroi2v")
    p.add_argument("--batch-size", type=int, default=8, help="clips per training step")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype on CUDA")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="model config overrides for every config"
    )
    return p.parse_args(argv)


def measure(path: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Builds the model of ``path`` and times ``args.steps`` training steps at ``args.batch_size``."""
    cfg = load_model_config(path, args.overrides)
    model = build_finetune_model(cfg).to(device).train()
    if args.gradient_checkpointing:
        use_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, lr=3e-4, weight_decay=0.05)
    size = model.vit.patch_embed.img_size
    dtype = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    mean, std = pixel_stats(model.vit, device)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, cfg.num_frames, 3, *size)
    video = torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8)
    labels = torch.randint(0, cfg.num_classes, (args.batch_size,), generator=g, device=device)

    def step() -> None:
        with autocast(device, dtype):
            logits = model(normalise_video(video, mean, std))
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=path.rsplit("/", 1)[-1], unit="step", leave=False):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    seconds = time.perf_counter() - start
    result = {
        "config": path,
        "kind": cfg.kind,
        "frames": cfg.num_frames,
        "img_size": list(size),
        "batch_size": args.batch_size,
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_gb": peak / 1e9,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "clips_per_second": args.batch_size * args.steps / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16" if dtype is not None else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    for path in args.config:
        rows.append(measure(path, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ntraining step, batch {args.batch_size}, {rows[0]['device']}, {rows[0]['precision']}")
    print(f"{'config':<48}{'trainable':>12}{'peak GB':>10}{'clips/s':>10}{'ms/step':>10}")
    for r in rows:
        name = r["config"].rsplit("/", 1)[-1]
        print(
            f"{name:<48}{r['trainable_parameters'] / 1e6:>11.2f}M{r['peak_memory_gb']:>10.2f}"
            f"{r['clips_per_second']:>10.2f}{r['ms_per_step']:>10.1f}"
        )
    print(f"reference: {PAPER_REFERENCE}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

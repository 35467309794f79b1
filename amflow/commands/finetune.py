"""``amflow finetune``: trains the AM-flow or ZeroI2V model end to end from videos (torchrun for DDP)."""

from __future__ import annotations

import argparse

from amflow.commands.options import POSITIVE, add_no_tensorboard, with_paths
from store.outputs import Input, Output

EPILOG = """examples:
  amflow finetune --dataset smarthome --root data/smarthome --protocol cs \\
      --config configs/models/amflow_vitb14_dinov2_am2_lstm.yaml --out runs/cs_ft micro_batch_size=4
  torchrun --nproc-per-node 4 -m amflow.cli finetune --dataset k400 --root data/k400 \\
      --config configs/models/zeroi2v_vitb16_clip_k400_8f.yaml --out runs/k400_zeroi2v
  amflow finetune ... --out runs/cs_ft --resume        (continue a killed run, same arguments)

Overrides: model.KEY=V (model config), data.KEY=V (dataset config), train.KEY=V (recipe); a bare
key goes to the one config that has it (lr=1e-4 augment.flip=0; num_frames=16 sets data and model).
The model config's num_frames and num_classes must be the dataset's (e.g. model.num_classes=19).
RUN_DIR gets config.yaml, last.safetensors, best.safetensors (best validation mean class accuracy),
resume.pt, steps.csv, curve.csv/png, confusion_val.csv/png and, last, metrics.json. Use the adapters
in stage 1 with amflow extract --checkpoint RUN_DIR/best.safetensors; fold ZeroI2V adapters into the
backbone with
  amflow merge RUN_DIR/best.safetensors --out merged.safetensors"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``finetune``."""
    p = subparsers.add_parser(
        "finetune",
        help="train adapters, aligning encoders and heads end to end from videos (AM flow or ZeroI2V)",
        description="End-to-end finetuning on a frozen backbone with the papers' recipe (AdamW 3e-4, weight "
        "decay 0.05, warmup then cosine, global batch 64 via gradient accumulation, augmentation), bf16 on "
        "CUDA, validation every epoch with stage 2's metrics. Under torchrun it runs DistributedDataParallel "
        "(each rank decodes its share; rank 0 writes).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset", required=True, help="dataset name (configs/datasets/NAME.yaml) or a YAML path"
    )
    p.add_argument(
        "--root", required=True, metavar="DIR", help="the dataset's release folder, or s3://BUCKET[/PREFIX]"
    )
    p.add_argument("--protocol", default=None, help="Smarthome cs|cv1|cv2, UCF101/HMDB51 split 1|2|3")
    p.add_argument("--config", required=True, help="model YAML (configs/models/...), kind amflow or zeroi2v")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    p.add_argument(
        "--recipe", default=None, help="training recipe YAML (default: configs/finetune/default.yaml)"
    )
    p.add_argument(
        "--weights",
        help="local backbone weights file or transformers folder; same as model.backbone.weights=",
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's pretrained weights of the backbone's tag (HF hub, or its cache offline); "
        "same as model.backbone.pretrained=true",
    )
    p.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="start from this checkpoint's adapters and head (amflow's own or amflow convert's); same as "
        "init_checkpoint=",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from resume.pt")
    p.add_argument("--overwrite", action="store_true", help="start again in a RUN_DIR that holds a run")
    p.add_argument(
        "--stop-after-steps",
        type=POSITIVE,
        default=None,
        metavar="N",
        help="stop after N optimiser steps in all (schedule unchanged), resumable with --resume",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_no_tensorboard(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides: data.KEY=V, model.KEY=V, train.KEY=V (recipe), or a bare KEY=V of one config",
    )
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The run directory (--resume continues it, --overwrite starts again; checked by the run itself)."""
    inputs = [
        Input("--root", args.root),
        Input("--config", args.config),
        Input("--recipe", args.recipe),
        Input("--weights", args.weights),
        Input("--init", args.init),
    ]
    return [Output("--out", args.out, resumable=True, folder=True)], inputs


def run(args: argparse.Namespace) -> int:
    """Plans, trains, prints the best epoch's validation table (rank 0)."""
    from stage2_temporal.finetuning.finetune import finetune_from_args
    from stage2_temporal.training.metrics import format_table

    result = finetune_from_args(
        args.dataset,
        args.root,
        args.config,
        args.out,
        protocol=args.protocol,
        recipe=args.recipe,
        overrides=list(args.overrides)
        + ([f"model.backbone.weights={args.weights}"] if args.weights else [])
        + (["model.backbone.pretrained=true"] if args.pretrained else [])
        + ([f"train.init_checkpoint={args.init}"] if args.init else []),
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after_steps=args.stop_after_steps,
        progress=not args.quiet,
        tensorboard=args.tensorboard,
    )
    if not result.is_main:
        return 0
    if not result.finished:
        print(f"stopped after {result.global_step} steps; continue with --resume (run in {args.out})")
        return 0
    m = result.metrics
    title = (
        f"validation ({m['val_split']}), best epoch {m['best_epoch']} of {m['epochs_run']}, "
        f"{m['seconds']:.1f} s, {m['train_clips_per_second']:.1f} clips/s, "
        f"{m['trainable_parameters']:,} trainable parameters, {m['world_size']} process(es)"
    )
    print(format_table(m["val"], m["class_names"], title))
    print(f"\nrun written to {args.out}")
    return 0

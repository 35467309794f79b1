"""``amflow extract``: stage 1, videos of a dataset split -> the Zarr feature store."""

from __future__ import annotations

import argparse

from amflow.commands.options import (
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    add_device,
    add_weights_options,
    compression,
    number_in,
    with_paths,
)
from store.outputs import Input, Output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="stage 1: decode a dataset split, run the frozen backbone + adapters, write the feature store",
        description="Decodes every clip of a dataset split (in DataLoader workers), runs the frozen "
        "ViT with AM-flow adapters in inference mode (bf16 on CUDA) and writes per-adapter embeddings, "
        "last-frame CLS features and optionally AM-flow maps to a Zarr store. Undecodable videos are "
        "recorded as failures. Interrupted runs resume with only the missing clips; a finished store is "
        "left untouched. Dataset settings come from configs/datasets/<name>.yaml; both configs are "
        "overridable by key=value (data./model. prefixes).",
        epilog="examples:\n"
        "  amflow extract --dataset smarthome --root data/smarthome --protocol cs --split train \\\n"
        "      --config configs/models/amflow_vitb14_dinov2_am2_lstm.yaml --out cache/cs_train.zarr\n"
        "  amflow extract --dataset folder --root demo_out/videos --split train \\\n"
        "      --config configs/models/amflow_tiny.yaml --out train.zarr --flow --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset", required=True, help="smarthome, k400, ssv2, ucf101, hmdb51, diving48, folder or list"
    )
    p.add_argument(
        "--root",
        required=True,
        help="the dataset's root folder, or s3://BUCKET[/PREFIX] (videos and annotation files read from the "
        "bucket; credentials from the standard AWS places)",
    )
    p.add_argument("--split", required=True, help="train, val/validation or test")
    p.add_argument("--protocol", help="smarthome: cs, cv1, cv2; ucf101/hmdb51: 1, 2, 3")
    p.add_argument(
        "--annotations", metavar="FILE", help="list dataset: the split's annotation file (path or s3:// URL)"
    )
    p.add_argument("--config", required=True, help="model YAML (kind: amflow)")
    p.add_argument("--out", required=True, help="the store to write (a .zarr folder)")
    p.add_argument("--checkpoint", help="finetuned adapters (.safetensors) or a merged ZeroI2V model")
    add_weights_options(p)
    p.add_argument("--flow", action="store_true", help="also store AM-flow maps (needed by flow-map heads)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="clips per forward (default 8)")
    p.add_argument(
        "--decode-workers", type=NON_NEGATIVE, default=2, help="DataLoader decoding processes (default 2)"
    )
    add_device(p, "auto", "auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--decode-device", choices=["cpu", "cuda"], default="cpu",
        help="cuda: decode on NVDEC (PyAV hwaccel) where it works, else the CPU with a warning",
    )  # fmt: skip
    p.add_argument("--decode-threads", type=POSITIVE, default=1, help="FFmpeg threads per decoding worker")
    p.add_argument("--compile", action="store_true", help="torch.compile the frozen forward (GPU runs)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype")
    p.add_argument("--shard-clips", type=POSITIVE, help="clips per shard (default: ~32 MB shards)")
    p.add_argument(
        "--compression", default="none", type=compression, help="none, zstd[:level] (1-22) or blosc[:level]"
    )
    p.add_argument("--workers", type=POSITIVE, default=1, help="extraction workers on a dask LocalCluster")
    p.add_argument(
        "--scheduler",
        help="address of an existing dask scheduler (tcp:// or tls://host:port; TLS credentials from dask's "
        "config, see README)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the dask dashboard of the local cluster on 127.0.0.1:8787",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if any video failed to decode")
    p.add_argument(
        "--train-views",
        type=NON_NEGATIVE,
        default=0,
        metavar="K",
        help="store K augmented training views per clip (random frames/start, random crop, --train-flip), "
        "seeded; stage 2 draws one per clip per epoch (default: the test-time views); training splits only",
    )
    p.add_argument(
        "--train-flip",
        type=number_in(0.0, 1.0),
        default=0.0,
        metavar="P",
        help="flip probability of a training view (0.5 where left/right does not change the class)",
    )
    p.add_argument("--train-views-seed", type=SEED, default=0, help="seed of the training views")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides: data.KEY=V (dataset config), model.KEY=V (model config); a bare key goes to the "
        "config that has it (num_crops=3, pooling=flow; num_frames=16 sets both)",
    )
    p.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """The store: an existing one is resumed (extract checks that it is the same extraction)."""
    inputs = [
        Input("--root", args.root),
        Input("--config", args.config),
        Input("--checkpoint", args.checkpoint),
        Input("--weights", args.weights),
        Input("--annotations", args.annotations),
    ]
    return [Output("--out", args.out, resumable=True, folder=True)], inputs


def run(args: argparse.Namespace) -> int:
    from foundation.cluster import check_reachable
    from stage1_extract.extraction.extract import ExtractOptions, plan_extraction, run_extraction

    if args.scheduler:
        check_reachable(args.scheduler)  # before any store is created

    overrides = list(args.overrides)
    if args.annotations:
        overrides.append(f"data.annotations={args.annotations}")
    if args.weights:
        overrides.append(f"model.backbone.weights={args.weights}")
    if args.pretrained:
        overrides.append("model.backbone.pretrained=true")
    options = ExtractOptions(
        batch_size=args.batch_size,
        decode_workers=args.decode_workers,
        device=args.device,
        store_flow=args.flow,
        dtype=args.dtype,
        shard_clips=args.shard_clips,
        compression=args.compression,
        decode_device=args.decode_device,
        decode_threads=args.decode_threads,
        compile=args.compile,
        train_views=args.train_views,
        train_flip=args.train_flip,
        train_views_seed=args.train_views_seed,
        dashboard=args.dashboard,
    )
    plan, store = plan_extraction(
        args.dataset,
        args.root,
        args.split,
        args.config,
        args.out,
        protocol=args.protocol,
        overrides=overrides,
        checkpoint=args.checkpoint,
        options=options,
    )
    summary = run_extraction(plan, store, workers=args.workers, scheduler=args.scheduler)
    if summary.already_complete:
        print(
            f"{args.out}: already complete ({summary.done} done, {summary.failed} failed): nothing to do "
            f"(`amflow store verify {args.out}` checks its data; `store repair`, then this, redo bad clips)"
        )
    else:
        print(f"extracted {args.dataset} {args.split} -> {args.out}")
        print(summary.table())
    if summary.failed:
        print(f"{summary.failed} clips failed to decode: see `amflow store info {args.out}`")
        if args.strict:
            return 1
    return 0

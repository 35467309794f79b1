"""``amflow store info|verify|export|import``: inspect, check and convert a feature store."""

from __future__ import annotations

import argparse
import json
import sys

from amflow.commands.options import with_paths, writes_nothing
from store import FeatureStore, StoreError, export_h5, format_info, import_h5, store_info, verify_store
from store.outputs import Input, Output
from store.repair import clips_text, repair_store

EPILOG = """examples:
  amflow store info runs/smarthome_cs/train.zarr
  amflow store info runs/smarthome_cs/train.zarr --json > info.json
  amflow store verify runs/smarthome_cs/train.zarr
  amflow store repair runs/smarthome_cs/train.zarr   (then the same amflow extract command)
  amflow store export runs/smarthome_cs/train.zarr --h5 train.h5
  amflow store import train.h5 --out restored.zarr

exit status: 0 ok, 1 verify found problems, 2 the command could not run (e.g. not a store)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``store`` and its four sub-commands."""
    parser = subparsers.add_parser(
        "store",
        help="inspect, verify, export or import a feature store (the stage-1 -> stage-2 cache)",
        description="Inspect, verify, export to HDF5 or import from HDF5 an amflow feature store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="store_command", required=True, metavar="{info,verify,repair,export,import}"
    )
    p = sub.add_parser(
        "info",
        help="arrays, shapes, sizes on disk, done/failed/missing counts and provenance",
        epilog="example: amflow store info runs/train.zarr --json",
    )
    p.add_argument("store", metavar="STORE", help="path of the store (a .zarr folder)")
    p.add_argument("--json", action="store_true", help="print the stable JSON form instead of a table")
    p = sub.add_parser(
        "verify",
        help="check every done clip is complete and finite; exit 1 listing the problems",
        epilog="example: amflow store verify runs/train.zarr",
    )
    p.add_argument("store", metavar="STORE", help="path of the store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser(
        "repair",
        help="mark damaged done clips (unreadable or non-finite data) missing, for extract to redo",
        epilog="example: amflow store repair runs/train.zarr && amflow extract ... --out runs/train.zarr",
    )
    p.add_argument("store", metavar="STORE", help="path of the store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser(
        "export",
        help="write the store's arrays and attributes to one HDF5 file",
        epilog="example: amflow store export runs/train.zarr --h5 train.h5",
    )
    p.add_argument("store", metavar="STORE", help="path of the store (a folder or s3://BUCKET/PATH.zarr)")
    p.add_argument("--h5", required=True, metavar="OUT.h5", help="HDF5 file to write (a local file)")
    p.add_argument("--compression", default="none", choices=["none", "gzip", "lzf"], help="HDF5 filter")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.h5 if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser(
        "import",
        help="rebuild a store from an HDF5 file written by 'amflow store export'",
        epilog="example: amflow store import train.h5 --out restored.zarr",
    )
    p.add_argument("h5", metavar="IN.h5", help="HDF5 file written by 'amflow store export'")
    p.add_argument(
        "--out", required=True, metavar="STORE", help="store to create: a folder or s3://BUCKET/PATH.zarr"
    )
    p.add_argument("--overwrite", action="store_true", help="replace STORE if it is an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=with_paths(run, paths))


def paths(args: argparse.Namespace) -> tuple[list[Output], list[Input]]:
    """export writes OUT.h5, import a store folder; info, verify and repair write no new file."""
    if args.store_command == "export":
        return [Output("--h5", args.h5, replace=args.overwrite)], [Input("STORE", args.store)]
    if args.store_command == "import":
        return [Output("--out", args.out, replace=args.overwrite, folder=True)], [Input("IN.h5", args.h5)]
    return writes_nothing(args)


def run(args: argparse.Namespace) -> int:
    """Runs the chosen sub-command; returns the exit status."""
    try:
        if args.store_command == "info":
            info = store_info(args.store)
            print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_info(info))
            return 0
        if args.store_command == "verify":
            warnings: list[str] = []
            problems = verify_store(args.store, progress=not args.quiet, warnings=warnings)
            for line in warnings:
                print(f"{args.store}: warning: {line}", file=sys.stderr)
            if problems:
                print(f"{args.store}: {len(problems)} problem(s):", file=sys.stderr)
                for line in problems:
                    print(f"  - {line}", file=sys.stderr)
                print(
                    f"`amflow store repair {args.store}` mends what it can and names what it cannot; then "
                    "the same `amflow extract` command re-extracts the clips it handed back",
                    file=sys.stderr,
                )
                return 1
            info = store_info(args.store)
            print(
                f"{args.store}: ok ({info['done']} done clips verified, {info['failed']} failed, "
                f"{info['missing']} missing)"
            )
            return 0
        if args.store_command == "repair":
            report = repair_store(args.store, progress=not args.quiet)
            for name in report.rebuilt:
                print(f"{args.store}: rebuilt {name} from the store's layout")
            for name in report.deleted:
                print(f"{args.store}: deleted unreadable {name}")
            if report.redo:
                listed = clips_text(FeatureStore.open(args.store), report.redo)
                print(f"{args.store}: {len(report.redo)} damaged clip(s) marked missing: {listed}")
            for d in report.left:
                mend = (
                    "the same `amflow extract` command rewrites it"
                    if d.mend == "extract"
                    else "cannot be repaired: extract into a new store (another --out) and delete this one"
                )
                print(f"{args.store}: {d.line}: {mend}", file=sys.stderr)
            if any(d.mend == "new store" for d in report.left):
                return 1
            if report.redo or any(d.mend == "extract" for d in report.left):
                print("run the same `amflow extract` command again to re-extract them")
            elif not (report.rebuilt or report.deleted):
                print(f"{args.store}: no damaged clips; nothing to repair")
            return 0
        if args.store_command == "export":
            out = export_h5(
                args.store,
                args.h5,
                compression=args.compression,
                overwrite=args.overwrite,
                progress=not args.quiet,
            )
            print(f"wrote {out}")
            return 0
        if args.store_command == "import":
            st = import_h5(args.h5, args.out, overwrite=args.overwrite, progress=not args.quiet)
            print(f"wrote {st.path} ({st.num_clips} clips)")
            return 0
    except KeyError as e:  # an array or clip the store lacks: a user error like the others
        raise StoreError(e.args[0] if e.args else str(e)) from e
    raise ValueError(f"unknown store command {args.store_command!r}")

"""``amflow datasets list``: prints the clips of a dataset split, one ``path<TAB>class_index`` line each."""

from __future__ import annotations

import argparse
import sys

from amflow.commands.options import with_paths, writes_nothing

EPILOG = """example:
  amflow datasets list --dataset smarthome --root /data/smarthome --protocol cs --split train > train_cs.tsv
  amflow datasets list --dataset list --root /data/mine --split val --annotations lists/val.csv

stdout holds exactly one line per clip: its path relative to ROOT, a tab, its class index; the summary
(clips, classes, missing files, skipped clips and why) goes to stderr. Compare with an official list:
  cut -f1 train_cs.tsv | xargs -n1 basename | sort | diff - <(sort train_CS.txt)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``datasets`` and its ``list`` action."""
    parser = subparsers.add_parser(
        "datasets",
        help="inspect datasets: list the clips and labels of a split",
        description="Inspect datasets as amflow reads them (METHOD.md section 5).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    lister = actions.add_parser(
        "list",
        help="print one 'relative/path<TAB>class_index' line per clip of a split",
        description="Print one 'relative/path<TAB>class_index' line per clip of a split; summary to stderr.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lister.add_argument(
        "--dataset", required=True, help="smarthome, k400, ssv2, ucf101, hmdb51, diving48, folder, list"
    )
    lister.add_argument("--root", required=True, help="the dataset's root folder, or s3://BUCKET[/PREFIX]")
    lister.add_argument("--split", required=True, help="train, val/validation or test (per dataset)")
    lister.add_argument("--protocol", help="smarthome: cs, cv1, cv2; ucf101/hmdb51: split number 1, 2, 3")
    lister.add_argument("--annotations", metavar="FILE", help="list dataset: the split's annotation file")
    lister.add_argument("--config", help="dataset YAML (default: configs/datasets/<dataset>.yaml)")
    lister.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dataset config overrides, bare or data.-prefixed"
    )
    lister.set_defaults(func=with_paths(run, writes_nothing))


def run(args: argparse.Namespace) -> int:
    """Lists the split; exit code 2 on a bad dataset, split, protocol, config or missing annotation."""
    import stage1_extract  # noqa: F401  (before anything that imports timm)
    from foundation.config import route_overrides
    from stage1_extract.videos.datasets import DatasetConfig, build_index, load_dataset_config

    overrides = route_overrides(args.overrides, {"data": DatasetConfig})["data"]
    if args.protocol is not None:
        overrides.append(f"protocol={args.protocol}")
    if args.annotations is not None:
        overrides.append(f"annotations={args.annotations}")
    cfg = load_dataset_config(args.config or args.dataset, overrides)
    index = build_index(args.dataset, args.root, args.split, cfg)
    sys.stdout.write("".join(f"{r.path}\t{r.label}\n" for r in index.records))
    sys.stdout.flush()
    print(index.summary(), file=sys.stderr)
    for record in index.missing[:20]:
        print(f"missing: {record.path}", file=sys.stderr)
    if len(index.missing) > 20:
        print(f"... and {len(index.missing) - 20} more missing", file=sys.stderr)
    for record in index.refused:
        print(f"refused (absolute or outside the root): {record.path}", file=sys.stderr)
    return 0

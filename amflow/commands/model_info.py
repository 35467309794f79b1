"""``amflow model-info``: the parameter report of a model config, per component."""

from __future__ import annotations

import argparse
import json

from amflow.commands.options import with_paths, writes_nothing


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "model-info",
        help="print a model config's parameters per component (total and trainable)",
        description="Builds the model of a config without allocating its weights and prints, per "
        "component (backbone, AM flow and linear layers, aligning encoders, temporal heads, last-frame "
        "head; or linear adapters and classifier for ZeroI2V), its total and trainable parameters, then "
        "the backbone family and, per block (runs of equal blocks on one line), its token grid, tokens, "
        "heads, width and attention window.",
        epilog="example:\n"
        "  amflow model-info --config configs/models/amflow_vitb14_dinov2_am12_lstm.yaml --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="model YAML (configs/models/...)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="model config overrides, bare or model.-prefixed: heads.hidden=256 model.bottleneck=64",
    )
    p.set_defaults(func=with_paths(run, writes_nothing))


def run(args: argparse.Namespace) -> int:
    import warnings

    from foundation.config import route_overrides
    from stage1_extract.families.backbone import RANDOM_INIT_WARNING
    from stage2_temporal.finetuning.models import (
        build_model_on_meta,
        load_model_config,
        model_config_class,
        parameter_report,
    )

    overrides = route_overrides(args.overrides, {"model": model_config_class(args.config)})["model"]
    cfg = load_model_config(args.config, overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_INIT_WARNING)  # nothing is initialised here
        report = parameter_report(build_model_on_meta(cfg))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'component':<20}{'total':>16}{'trainable':>16}")
    for name, c in report["components"].items():
        print(f"{name:<20}{c['total']:>16,}{c['trainable']:>16,}")
    print(f"{'all':<20}{report['total']:>16,}{report['trainable']:>16,}")
    print(f"\nfamily {report['family']}")
    print(f"{'blocks':<12}{'grid':>10}{'tokens':>8}{'heads':>7}{'width':>7}{'window':>10}")
    runs: list[list[dict]] = []
    for b in report["blocks"]:
        if runs and {**runs[-1][-1], "block": 0} == {**b, "block": 0}:
            runs[-1].append(b)
        else:
            runs.append([b])
    for run_ in runs:
        b, last = run_[0], run_[-1]["block"]
        where = f"{b['block']}" if last == b["block"] else f"{b['block']}-{last}"
        grid = "x".join(map(str, b["grid"]))
        window = "x".join(map(str, b["window"])) if b["window"] else "global"
        pools = " (pools)" if b["pools"] else ""
        print(f"{where:<12}{grid:>10}{b['tokens']:>8}{b['heads']:>7}{b['width']:>7}{window:>10}{pools}")
    return 0

"""Sweeps: every combination of a grid of training configs, trained in parallel from one feature cache.

A grid file (``configs/sweeps/*.yaml``) names a base training config, overrides fixed for every run and a
``grid`` of dotted keys -> lists of values. Each combination's resolved config gets a directory named by a
stable hash of it (``runs/<hash>``); a run is finished when its ``metrics.json`` exists, so a restarted
sweep skips finished runs and redoes the others. Runs go to dask.distributed workers (a local cluster of
processes by default, or an existing scheduler); each worker opens the stores itself, once.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from foundation.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from foundation.config import (
    ConfigError,
    build_config,
    config_to_dict,
    deep_merge,
    parse_overrides,
    read_yaml,
    resolve_config_path,
    route_overrides,
)
from stage2_temporal.heads import drop_ignored_head_keys, ignored_head_keys
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.data import CachedFeatures
from stage2_temporal.training.run_dir import (
    FINGERPRINT_FILE,
    METRICS_FILE,
    is_finished,
    read_json,
    read_metrics,
    write_json_atomic,
)
from store.objects import store_location

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
COMBO_FILE = "combination.json"
ERROR_FILE = "error.txt"
SWEEP_FILE = "sweep.yaml"
METRIC_COLUMNS = (
    "val_mean_class_acc",
    "val_top1",
    "val_top5",
    "best_epoch",
    "epochs_run",
    "seconds",
    "parameters",
)


@dataclass
class SweepGrid:
    """A sweep: base training config (a YAML path or None for defaults), fixed overrides, the grid."""

    base: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def validate(self) -> None:
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: expected a non-empty list of values")


@dataclass
class SweepRun:
    """One combination of the grid: its values, resolved config, stable id and directory."""

    combination: dict[str, Any]
    config: TrainConfig
    run_id: str
    run_dir: Path


@dataclass
class SweepResult:
    """What a sweep did, and where its leaderboard is."""

    runs: int
    trained: int
    skipped: int
    failed: list[str]
    leaderboard: list[dict[str, Any]]
    leaderboard_csv: Path
    leaderboard_md: Path
    plot: Path
    seconds: float


def load_grid(path: str | Path) -> SweepGrid:
    """Reads a sweep grid YAML (keys: base, fixed, grid)."""
    return build_config(SweepGrid, read_yaml(path), str(resolve_config_path(path)))


def with_overrides(grid: SweepGrid, overrides: Sequence[str], source: str = "<grid>") -> SweepGrid:
    """The grid with ``KEY=V`` / ``train.KEY=V`` overrides added to its fixed keys (every run gets them)."""
    routed = route_overrides(overrides, {"train": TrainConfig})["train"]
    fixed = dict(grid.fixed)
    for item in routed:
        key = item.split("=", 1)[0].strip()
        if key in grid.grid:
            raise ConfigError(f"override {item!r}: {source} sweeps '{key}'; change its grid instead")
        node: Any = parse_overrides([item])  # the value parsed as every override's (YAML scalar or list)
        for part in key.split("."):
            node = node[int(part) if part.lstrip("+-").isdigit() else part]
        fixed[key] = node
    return SweepGrid(grid.base, fixed, dict(grid.grid))


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"heads.type": "tcn"}`` -> ``{"heads": {"type": "tcn"}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def run_id(cfg: TrainConfig) -> str:
    """A stable hash of the resolved config (the device excluded): equal configs share a directory."""
    data = config_to_dict(cfg)
    data.pop("device")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def expand_grid(grid: SweepGrid, sweep_dir: str | Path, source: str = "<grid>") -> list[SweepRun]:
    """Every distinct combination of the grid as a resolved, validated config with its run directory.

    A head type reads only its own keys (transformer heads have no ``hidden``): keys the chosen type
    ignores are dropped (shown as ``n/a``), and combinations that then repeat another are skipped, once,
    with a log line that says how many and why.
    """
    base = read_yaml(grid.base) if grid.base else {}
    base = deep_merge(base, nest(grid.fixed))
    keys = list(grid.grid)
    runs: dict[str, SweepRun] = {}
    skipped: dict[str, int] = {}  # head type -> combinations skipped as repeats
    ignored_by: dict[str, set[str]] = {}
    for values in itertools.product(*(grid.grid[k] for k in keys)):
        combination = dict(zip(keys, values))
        label = ", ".join(f"{k}={v}" for k, v in combination.items())
        merged = deep_merge(base, nest(combination))
        ignored = ignored_head_keys(merged.get("heads", {}))
        shown = {k: ("n/a" if k.removeprefix("heads.") in ignored else v) for k, v in combination.items()}
        cfg = build_config(TrainConfig, drop_ignored_head_keys(merged), f"{source} ({label})")
        rid = run_id(cfg)
        if rid in runs:
            if ignored:
                skipped[cfg.heads.type] = skipped.get(cfg.heads.type, 0) + 1
                ignored_by.setdefault(cfg.heads.type, set()).update(f"heads.{k}" for k in ignored)
            continue
        runs[rid] = SweepRun(shown, cfg, rid, Path(sweep_dir) / RUNS_DIR / rid)
    for head_type, count in skipped.items():
        log.info(
            "skipped %d combinations of %s heads that differ only in keys these heads ignore (%s)",
            count,
            head_type,
            ", ".join(sorted(ignored_by[head_type])),
        )
    return list(runs.values())


@dataclass(frozen=True)
class StoreRef:
    """A store a sweep's workers open themselves (a folder every worker sees, or an ``s3://`` URL)."""

    path: str
    with_flow: bool = False
    memory_budget: int | None = None  # per worker; None: half the worker's available RAM

    @property
    def source(self) -> str:
        return self.path

    @property
    def fingerprint_fields(self) -> dict[str, Any]:
        from stage2_temporal.training.data import store_fingerprint_fields

        return store_fingerprint_fields(self.path)


@functools.lru_cache(maxsize=1)
def open_refs(train: StoreRef, val: StoreRef) -> tuple[Any, Any]:
    """The features of a pair of stores in this process, opened once per worker and kept for its next
    runs: in memory when they fit the budget, else streamed (``stream.open_pair``)."""
    from stage2_temporal.training.stream import open_pair

    return open_pair(
        train.path, val.path, with_flow=train.with_flow, memory_budget=train.memory_budget, progress=False
    )


def train_one(
    train: CachedFeatures | StoreRef,
    val: CachedFeatures | StoreRef,
    config: dict[str, Any],
    combination: dict[str, Any],
    run_dir: str,
    threads: int | None = None,
    tensorboard: bool = True,
    ship: bool = False,
) -> dict[str, Any]:
    """Trains one run of a sweep (in a worker); a failure is recorded in ``error.txt``, not raised.

    ``ship=True`` (workers on other machines, which share only the stores) trains in a temp folder of
    the worker and returns the run's files as ``files`` (relative path -> bytes) for :func:`receive_run`.
    """
    import torch

    from stage2_temporal.training.train import train_heads

    if threads:
        torch.set_num_threads(threads)
    if isinstance(train, StoreRef):
        train, val = open_refs(train, val)
    out = Path(tempfile.mkdtemp(prefix="amflow-run-")) if ship else Path(run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).unlink(missing_ok=True)
        write_json_atomic(combination, out / COMBO_FILE)
        try:
            cfg = build_config(TrainConfig, config, str(Path(run_dir) / "config.yaml"))
            metrics = train_heads(train, val, cfg, out, progress=False, tensorboard=tensorboard)
            result = {
                "run_dir": run_dir,
                "status": "done",
                "mean_class_acc": metrics["val"]["mean_class_acc"],
            }
        except Exception as e:  # one bad combination must not stop the sweep
            (out / ERROR_FILE).write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
            result = {"run_dir": run_dir, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        if ship:
            result["files"] = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        return result
    finally:
        if ship:
            shutil.rmtree(out, ignore_errors=True)


def receive_run(result: dict[str, Any]) -> dict[str, Any]:
    """Writes the files a worker shipped (``train_one(ship=True)``) into the run directory, each atomically
    and ``metrics.json`` last, so a run interrupted while being received does not look finished."""
    files = result.pop("files", None)
    if files is None:
        return result
    run_dir = Path(result["run_dir"])
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    for rel in sorted(files, key=lambda r: r == METRICS_FILE):
        write_bytes_atomic(run_dir / rel, files[rel])
    return result


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"[{len(value)} items]" if len(value) > 3 else "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def leaderboard_rows(runs: Sequence[SweepRun]) -> list[dict[str, Any]]:
    """One row per run (finished ones by decreasing validation mean class accuracy, then the others)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.run_id}
        row.update({k: _short(v) for k, v in run.combination.items()})
        if is_finished(run.run_dir):
            m = read_metrics(run.run_dir)
            row.update(
                status="done",
                val_mean_class_acc=m["val"]["mean_class_acc"],
                val_top1=m["val"]["top1"],
                val_top5=m["val"]["top5"],
                best_epoch=m["best_epoch"],
                epochs_run=m["epochs_run"],
                seconds=round(m["seconds"], 2),
                parameters=m["trainable_parameters"],
            )
        else:
            status = "failed" if (run.run_dir / ERROR_FILE).is_file() else "not run"
            row["status"] = status
            row.update(dict.fromkeys(METRIC_COLUMNS))
        rows.append(row)
    rows.sort(key=lambda r: (r["val_mean_class_acc"] is None, -(r["val_mean_class_acc"] or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row["status"] == "done" else None
    return [{"rank": r.pop("rank"), **r} for r in rows]


def write_leaderboard(rows: Sequence[dict[str, Any]], sweep_dir: str | Path) -> tuple[Path, Path, Path]:
    """``leaderboard.csv``, ``leaderboard.md`` (accuracies in %) and ``leaderboard.png``."""
    from stage2_temporal.training.plots import plot_leaderboard

    sweep_dir = Path(sweep_dir)
    csv_path, md_path, png_path = (sweep_dir / f"leaderboard.{ext}" for ext in ("csv", "md", "png"))
    columns = list(rows[0])
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key.startswith("val_"):
            return f"{100 * value:.2f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in columns) + " |" for r in rows]
    write_text_atomic(md_path, "\n".join(lines) + "\n")
    done = [r for r in rows if r["status"] == "done"]
    grid_keys = [c for c in columns if c not in ("rank", "run", "status", *METRIC_COLUMNS)]
    labels = [" ".join(f"{k.split('.')[-1]}={r[k]}" for k in grid_keys) or r["run"] for r in done]
    plot_leaderboard(labels, [r["val_mean_class_acc"] for r in done], png_path)
    return csv_path, md_path, png_path


def _record_sweep(
    sweep_dir: Path,
    grid: SweepGrid,
    train: CachedFeatures | StoreRef,
    val: CachedFeatures | StoreRef,
    force: bool,
) -> None:
    """Writes (or, on a restart, checks) the sweep's record: same training features as before."""
    from store.feature_store import fingerprint_differences

    record = sweep_dir / FINGERPRINT_FILE
    if record.is_file():
        before = read_json(record).get("fingerprint_fields") or {}
        diffs = fingerprint_differences(before, train.fingerprint_fields)
        if diffs and not force:
            raise ValueError(
                f"{sweep_dir}: its finished runs were trained on other features than "
                f"{train.source} ({len(diffs)} field(s) differ):\n  "
                + "\n  ".join(diffs)
                + "\n(use another --out, or --force to mix them)"
            )
    write_text_atomic(sweep_dir / SWEEP_FILE, yaml.safe_dump(config_to_dict(grid), sort_keys=False))
    write_json_atomic(
        {"train": train.source, "val": val.source, "fingerprint_fields": train.fingerprint_fields}, record
    )


def run_sweep(
    train: CachedFeatures | StoreRef,
    val: CachedFeatures | StoreRef,
    grid: SweepGrid,
    sweep_dir: str | Path,
    workers: int = 2,
    scheduler: str | None = None,
    force: bool = False,
    progress: bool = True,
    source: str = "<grid>",
    tensorboard: bool = True,
    dashboard: bool = False,
) -> SweepResult:
    """Trains every unfinished combination of ``grid`` and writes the leaderboard.

    ``workers=0`` trains in this process (no dask); otherwise a ``LocalCluster`` of ``workers`` processes
    (one thread each, TLS with temporary credentials, a dashboard only with ``dashboard``), or the dask
    scheduler at ``scheduler``. In-memory caches are sent to every worker once; with :class:`StoreRef` s
    each worker opens the stores itself (in memory only when they fit its share of the budget, else
    streamed).
    """
    start = time.perf_counter()
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs = expand_grid(grid, sweep_dir, source)
    _record_sweep(sweep_dir, grid, train, val, force)
    todo = [r for r in runs if not is_finished(r.run_dir)]
    log.info("%d runs, %d finished before, %d to train", len(runs), len(runs) - len(todo), len(todo))
    results = []
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress)

    def jobs():
        for run in todo:
            yield config_to_dict(run.config), run.combination, str(run.run_dir)

    if todo and workers == 0 and scheduler is None:
        for args in jobs():
            results.append(train_one(train, val, *args, tensorboard=tensorboard))
            bar.update()
    elif todo:
        from distributed import as_completed

        from foundation.cluster import client_for

        threads = None if scheduler else max(1, (os.cpu_count() or 1) // workers)
        client, cluster = client_for(
            workers, scheduler, dashboard=dashboard, memory_limit=0, silence_logs=logging.ERROR
        )
        try:
            if isinstance(train, StoreRef):  # workers open the stores themselves
                train_f, val_f = train, val
                if train.memory_budget is None and cluster is not None:
                    from store.budget import parse_memory_budget

                    share = parse_memory_budget(None) // workers
                    train_f, val_f = (replace(r, memory_budget=share) for r in (train, val))
            else:
                train_f = client.scatter(train, broadcast=True, hash=False)
                val_f = client.scatter(val, broadcast=True, hash=False)
            futures = [
                client.submit(
                    train_one,
                    train_f,
                    val_f,
                    *args,
                    threads,
                    tensorboard,
                    scheduler is not None,  # an existing cluster may span machines: runs come back
                    key=f"heads-{Path(args[2]).name}",
                    pure=False,
                )
                for args in jobs()
            ]
            for future in as_completed(futures):
                results.append(receive_run(future.result()))
                bar.update()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    bar.close()
    failed = [r["run_dir"] for r in results if r["status"] == "failed"]
    for r in results:
        if r["status"] == "failed":
            log.error("run %s failed: %s", r["run_dir"], r["error"])
    rows = leaderboard_rows(runs)
    csv_path, md_path, png_path = write_leaderboard(rows, sweep_dir)
    return SweepResult(
        runs=len(runs),
        trained=len(results) - len(failed),
        skipped=len(runs) - len(todo),
        failed=failed,
        leaderboard=rows,
        leaderboard_csv=csv_path,
        leaderboard_md=md_path,
        plot=png_path,
        seconds=time.perf_counter() - start,
    )


def sweep_needs_flow(grid: SweepGrid, sweep_dir: str | Path, source: str = "<grid>") -> bool:
    """Whether any run of the grid reads AM-flow maps (so the caches must be loaded with them)."""
    return any(r.config.heads.flow_maps for r in expand_grid(grid, sweep_dir, source))


def run_sweep_from_stores(
    train_store: str | Path,
    val_store: str | Path,
    grid_path: str | Path,
    sweep_dir: str | Path,
    workers: int = 2,
    scheduler: str | None = None,
    force: bool = False,
    progress: bool = True,
    overrides: Sequence[str] = (),
    memory_budget: int | str | None = None,
    tensorboard: bool = True,
    allow_incomplete: bool = False,
    dashboard: bool = False,
) -> SweepResult:
    """Checks the stores (complete, undamaged, same features and classes) and ``sweep_dir`` before
    anything is written, then sweeps; every worker opens the stores itself (flow maps if any run needs
    them), in memory when they fit ``memory_budget`` (per worker), else streamed.

    ``overrides`` (``KEY=V`` or ``train.KEY=V``) are fixed for every run, recorded in ``sweep.yaml``.
    """
    from stage2_temporal.training.checks import (
        check_out_dir,
        check_store_pair,
        check_store_usable,
        make_run_dir,
    )
    from stage2_temporal.training.data import check_same_features
    from store.budget import parse_memory_budget

    source = str(resolve_config_path(grid_path))
    grid = with_overrides(load_grid(grid_path), overrides, source)
    if not grid.grid:
        raise ConfigError(f"{source}: 'grid' is empty; nothing to sweep")
    check_out_dir(sweep_dir)
    if workers < 0:
        raise ValueError(f"--workers: expected >= 0, got {workers}")
    if scheduler:
        from foundation.cluster import check_reachable

        check_reachable(scheduler)
    flow = sweep_needs_flow(grid, sweep_dir, source)
    arrays = ("embeddings", "cls", "flow") if flow else ("embeddings", "cls")
    train_st = check_store_usable(train_store, arrays, allow_incomplete)
    val_st = check_store_usable(val_store, arrays, allow_incomplete)
    check_same_features(val_store, train_st.fingerprint_fields, force=force)
    check_store_pair(train_st, val_st)
    budget = None if memory_budget is None else parse_memory_budget(memory_budget)
    train = StoreRef(store_location(train_store), flow, budget)
    val = StoreRef(store_location(val_store), flow, budget)
    make_run_dir(sweep_dir)
    return run_sweep(
        train,
        val,
        grid,
        sweep_dir,
        workers,
        scheduler,
        force,
        progress,
        source,
        tensorboard=tensorboard,
        dashboard=dashboard,
    )

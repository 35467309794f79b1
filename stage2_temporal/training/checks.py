"""What stage 2 checks before it reads a store or writes a run, so nothing silently wrong gets through.

- Class names: two stores (train/val) or a run and a store must list the same classes in the same order
  (a label is an index into that list); a mismatch is refused naming the first difference.
- A store must be complete (every clip done or failed) unless ``allow_incomplete``, and its done clips
  readable and finite (``amflow store repair`` hands damaged clips back to extraction).
- A run directory is created only after every check passed; ``--overwrite`` moves an old run aside first;
  a run without ``metrics.json`` is not a finished run and is not evaluated.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from stage2_temporal.training.run_dir import METRICS_FILE
from store import FeatureStore
from store.outputs import Output, check_outputs
from store.repair import clips_text, damage_summary, find_damage, scan_clips

log = logging.getLogger(__name__)


def store_class_names(store: FeatureStore) -> list[str] | None:
    """The class names a store was extracted with, or None if it has none."""
    return store.class_names


def check_class_names(
    expected: Sequence[str] | None, got: Sequence[str] | None, expected_what: str, got_what: str
) -> None:
    """Refuses two class lists that differ in names or order, naming the first difference."""
    if expected is None or got is None:
        missing = expected_what if expected is None else got_what
        log.warning("%s records no class names; only the number of classes is compared", missing)
        return
    expected, got = list(expected), list(got)
    if expected == got:
        return
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            raise ValueError(
                f"{got_what}: class {i} is {b!r}, but {a!r} in {expected_what} (the class names or their "
                "order differ; labels are positions in that list)"
            )
    raise ValueError(
        f"{got_what}: {len(got)} classes, {len(expected)} in {expected_what} "
        f"(first difference: class {min(len(got), len(expected))})"
    )


def check_store_usable(
    path: str | Path, arrays: Sequence[str] = ("embeddings", "cls"), allow_incomplete: bool = False
) -> FeatureStore:
    """Opens a store for stage 2: complete (or ``allow_incomplete``), no damaged done clip in ``arrays``."""
    st = FeatureStore.open(path, mode="r")
    # Damaged data files are left to the scan below, which reads only the arrays stage 2 uses.
    damage = [d for d in find_damage(st) if d.shard is None or d.array not in st.data_arrays]
    if damage:
        raise ValueError(f"{path}: {damage_summary(st, damage)}")
    counts = st.counts()
    if counts["missing"]:
        done_or_failed = st.num_clips - counts["missing"]
        if not allow_incomplete:
            raise ValueError(
                f"{path}: incomplete store ({counts['missing']} of {st.num_clips} clips not extracted, "
                f"{done_or_failed} done or failed); finish it by running the same amflow extract command "
                "again, or pass --allow-incomplete to use only its done clips"
            )
        log.warning(
            "%s: incomplete store (--allow-incomplete): using %d done clips of %d (%d missing, %d failed)",
            path,
            counts["done"],
            st.num_clips,
            counts["missing"],
            counts["failed"],
        )
    scan = scan_clips(st, [a for a in arrays if a in st.data_arrays])
    if scan.damaged:
        unreadable = sorted({shard for shards in scan.unreadable.values() for shard, _ in shards})
        where = f" (unreadable shard(s) {unreadable})" if unreadable else ""
        raise ValueError(
            f"{path}: {len(scan.damaged)} done clip(s) have unreadable or non-finite features{where}: "
            f"{clips_text(st, scan.damaged)}; run `amflow store repair {path}`, then the same amflow "
            "extract command to re-extract them"
        )
    return st


def check_store_pair(
    train: FeatureStore, other: FeatureStore, what: str = "validation store"
) -> list[str] | None:
    """A second store (validation/test) must have the training store's classes, in the same order."""
    names = store_class_names(train)
    check_scoring_store(other, what)
    check_class_names(names, store_class_names(other), f"training store {train.path}", f"{what} {other.path}")
    return names


def check_scoring_store(st: FeatureStore, what: str = "validation store") -> None:
    """A store that scores a run (validation, test) holds test-time views, not augmented training views."""
    views = (st.provenance.get("train_views") or {}).get("views") or 0
    if views:
        raise ValueError(
            f"{what} {st.path}: holds {views} augmented training views per clip (extract --train-views); "
            "a validation or test store is extracted without --train-views"
        )


def check_finished_run(run_dir: str | Path) -> Path:
    """A run directory with ``metrics.json`` (written last): refuses an unfinished or half-rewritten run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such run directory")
    if not (run_dir / METRICS_FILE).is_file():
        raise ValueError(
            f"--run {run_dir}: no {METRICS_FILE}, so the run never finished (killed, failed or still "
            "running); train it again with amflow train-heads --overwrite"
        )
    return run_dir


def check_out_dir(out: str | Path, arg: str = "--out") -> Path:
    """``out`` can hold a run: not a regular file, and its nearest existing folder writable (nothing made)."""
    check_outputs([Output(arg, out, resumable=True, folder=True)])
    return Path(out)


def make_run_dir(out: str | Path, overwrite: bool = False, arg: str = "--out") -> Path | None:
    """Creates the run directory; with ``overwrite`` an existing non-empty one is first renamed aside.

    Returns where the old run went (None when nothing was moved). The rename is atomic, so the old run
    is never half-replaced: it is either at ``out`` or complete beside it.
    """
    out = check_out_dir(out, arg)
    moved = None
    if overwrite and out.is_dir() and any(out.iterdir()):
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        moved = out.with_name(f"{out.name}.replaced-{stamp}")
        k = 1
        while moved.exists():
            moved, k = out.with_name(f"{out.name}.replaced-{stamp}-{k}"), k + 1
        _os_call(os.rename, out, moved, arg=arg)
        log.warning("%s %s: the previous run was moved to %s", arg, out, moved)
    _os_call(lambda p: p.mkdir(parents=True, exist_ok=True), out, arg=arg)
    return moved


def _os_call(fn, *paths: Path, arg: str) -> None:
    """Runs a filesystem call; an OSError becomes a one-line ValueError naming the argument and path."""
    try:
        fn(*paths)
    except OSError as e:
        raise ValueError(f"{arg} {paths[0]}: {e.strerror or e}") from e

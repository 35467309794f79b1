"""What a store holds (``amflow store info``) and whether its done clips are sound (``store verify``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from store.feature_store import STRING_DTYPE, FeatureStore
from store.repair import find_damage, scan_clips, scan_problems, scan_warnings


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (what the array takes on disk)."""
    total = 0
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def store_info(store: FeatureStore | str | Path) -> dict[str, Any]:
    """A stable JSON-able summary: counts, arrays (shape, dtype, bytes on disk), fingerprint, provenance."""
    st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    counts = st.counts()
    arrays = {}
    for name in st.array_names:
        arr = st.array(name)
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": "string" if arr.dtype == STRING_DTYPE else str(arr.dtype),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards or arr.chunks),
            "bytes_on_disk": (
                sum(m["size"] for m in st.objects.list(name + "/"))
                if st.objects is not None
                else folder_bytes(st.path / name)
            ),
        }
    return {
        "path": str(st.path),
        "schema_version": st.attrs["schema_version"],
        "num_clips": st.num_clips,
        "done": counts["done"],
        "failed": counts["failed"],
        "missing": counts["missing"],
        "complete": counts["missing"] == 0,
        "num_shards": st.num_shards,
        "shard_clips": st.shard_clips,
        "pending_shards": len(st.pending_shards()),
        "compression": st.layout.compression,
        "arrays": arrays,
        "bytes_on_disk": sum(a["bytes_on_disk"] for a in arrays.values()),
        "adapter_names": st.adapter_names,
        "flow_block_names": st.flow_block_names,
        "flow_blocks": [b.to_dict() for b in st.flow_geometry],
        "class_names": st.class_names,
        "fingerprint": st.fingerprint,
        "fingerprint_fields": st.fingerprint_fields,
        "provenance": st.provenance,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_info(info: dict[str, Any]) -> str:
    """The human form of :func:`store_info`: a header, an array table and the provenance."""
    lines = [
        f"store        {info['path']}",
        f"clips        {info['num_clips']}  (done {info['done']}, failed {info['failed']}, "
        f"missing {info['missing']}){'  complete' if info['complete'] else ''}",
        f"shards       {info['num_shards']} x {info['shard_clips']} clips "
        f"({info['pending_shards']} pending), compression {info['compression']}",
        f"on disk      {_human_bytes(info['bytes_on_disk'])}",
        f"fingerprint  {info['fingerprint']}",
        "",
    ]
    rows = [("array", "shape", "dtype", "chunk", "shard", "on disk")]
    for name, a in info["arrays"].items():
        rows.append(
            (
                name,
                "x".join(map(str, a["shape"])),
                a["dtype"],
                "x".join(map(str, a["chunks"])),
                "x".join(map(str, a["shards"])),
                _human_bytes(a["bytes_on_disk"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", f"adapters     {', '.join(info['adapter_names'])}"]
    for name, b in zip(info["flow_block_names"], info["flow_blocks"], strict=True):
        grid = "x".join(map(str, b["grid"])) if b["grid"] else "?"
        lines.append(
            f"flow block   {name}: {b['channels']} x {b['tokens']} tokens (grid {grid}, "
            f"{b['prefix_tokens']} prefix), heads {b['heads'] or '?'}, width {b['width'] or '?'}"
        )
    if info["class_names"]:
        lines.append(f"classes      {len(info['class_names'])}: {', '.join(info['class_names'])}")
    lines += ["", "provenance"]
    for key, value in info["provenance"].items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"  {key}: {text if len(text) <= 200 else text[:197] + '...'}")
    lines += ["", "fingerprint fields"]
    for key, value in info["fingerprint_fields"].items():
        lines.append(f"  {key}: {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)


def verify_store(
    store: FeatureStore | str | Path, *, progress: bool = True, warnings: list[str] | None = None
) -> list[str]:
    """Checks that every done clip has complete, finite data and that the tables are consistent.

    Returns one line per problem (empty when the store is sound); lines about suspicious but legal data
    (done clips that are all zeros) are appended to ``warnings`` when given.
    """
    st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    damage = find_damage(st)
    problems = [d.line for d in damage]
    if any(d.array == "clip_ids" for d in damage):
        return problems  # clips cannot be named: the values are not worth reading
    scan = scan_clips(st, progress=progress)
    problems += scan_problems(st, scan)
    if warnings is not None:
        warnings += scan_warnings(st, scan)
    return problems

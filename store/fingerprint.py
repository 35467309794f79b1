"""The store's fingerprint: the settings that change the features, hashed, and their differences."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from store.schema import (
    FingerprintMismatch,
    StoreError,
)

if TYPE_CHECKING:
    from store.feature_store import FeatureStore


def package_version() -> str:
    """The installed amflow version, recorded in every store's provenance."""
    try:
        return importlib.metadata.version("amflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def canonical_json(value: Any, what: str = "value") -> str:
    """JSON with sorted keys and no whitespace, so equal settings always hash equally."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(
            f"{what} must be JSON-serialisable (str, int, float, bool, None, list, dict): {e}"
        ) from e


def compute_fingerprint(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the fields that change the features."""
    return hashlib.sha256(canonical_json(dict(fields), "fingerprint_fields").encode()).hexdigest()


class _Missing:
    """The value of a key that one side of a ``config_differences`` comparison does not have."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def flatten_dotted(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}`` so a difference can be named by its dotted key."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten_dotted(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_differences(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, stored value, expected value)`` per differing leaf of two JSON-like configs, sorted by
    key; ``MISSING`` where one side lacks the key. Leaves compare as canonical JSON."""
    a = flatten_dotted(json.loads(canonical_json(dict(stored))))
    b = flatten_dotted(json.loads(canonical_json(dict(expected))))
    return [
        (key, a.get(key, MISSING), b.get(key, MISSING))
        for key in sorted(set(a) | set(b))
        if key not in a or key not in b or canonical_json(a[key]) != canonical_json(b[key])
    ]


def fingerprint_differences(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """One line per differing field (dotted key): ``key: stored X, expected Y``."""
    lines = []
    for key, a, b in config_differences(stored, expected):
        if a is MISSING:
            lines.append(f"{key}: not in the store, expected {json.dumps(b)}")
        elif b is MISSING:
            lines.append(f"{key}: stored {json.dumps(a)}, not expected")
        else:
            lines.append(f"{key}: stored {json.dumps(a)}, expected {json.dumps(b)}")
    return lines


def check_fingerprint(
    store: FeatureStore, expected_fields: Mapping[str, Any], force: bool = False
) -> list[str]:
    """Refuses a store made from other settings, naming each differing field; with ``force`` only warns.

    Returns the list of differences (empty when the fingerprints match).
    """
    if compute_fingerprint(expected_fields) == store.fingerprint:
        return []
    diffs = fingerprint_differences(store.fingerprint_fields, expected_fields)
    msg = f"{store.path}: the store was made with other settings ({len(diffs)} field(s) differ):\n  " + (
        "\n  ".join(diffs)
    )
    if not force:
        raise FingerprintMismatch(msg + "\n(use --force to use it anyway)")
    warnings.warn(msg + "\n(--force given: using it anyway)", stacklevel=2)
    return diffs

"""File hashing: the SHA-256 recorded as the provenance of weights and checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path | None) -> str | None:
    """The SHA-256 of a file (provenance of weights and checkpoints), or None without a file."""
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

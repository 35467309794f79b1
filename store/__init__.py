"""The Zarr feature store between stage 1 and stage 2 (imports neither stage).

Writing needs only numpy and zarr; the torch readers (``FeatureDataset``, ``ShardOrderedSampler``) are
imported on first use so that writer processes do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from store.feature_store import (
    SCHEMA_VERSION,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_MISSING,
    FeatureStore,
    FingerprintMismatch,
    NonFiniteFeaturesError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreError,
    StoreLayout,
    check_fingerprint,
    compute_fingerprint,
    is_store,
)
from store.h5io import export_h5, import_h5
from store.layout import FlowBlock
from store.reader import StoreArrays, load_arrays
from store.schema import ShardBusyError
from store.summary import format_info, store_info, verify_store
from store.writer import BackgroundCommits, ShardWriter

_TORCH_READERS = ("FeatureDataset", "ShardOrderedSampler")

__all__ = [
    "SCHEMA_VERSION",
    "STATUS_DONE",
    "STATUS_FAILED",
    "STATUS_MISSING",
    "BackgroundCommits",
    "FeatureStore",
    "FingerprintMismatch",
    "FlowBlock",
    "NonFiniteFeaturesError",
    "NotAStoreError",
    "ReadOnlyStoreError",
    "ShardBusyError",
    "ShardWriter",
    "StoreError",
    "StoreArrays",
    "StoreLayout",
    "check_fingerprint",
    "compute_fingerprint",
    "export_h5",
    "format_info",
    "import_h5",
    "is_store",
    "load_arrays",
    "store_info",
    "verify_store",
    *_TORCH_READERS,
]


def __getattr__(name: str) -> Any:
    if name in _TORCH_READERS:
        from store import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")

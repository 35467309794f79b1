"""Names every module of the store shares: clip statuses, the text dtype, the lock folder, the errors.

It imports no other module of the store, so ``feature_store`` and ``writer`` both import it without a
circle.
"""

from __future__ import annotations

import numpy as np

STATUS_MISSING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
STRING_DTYPE = np.dtypes.StringDType()
LOCK_DIR = "_locks"


class StoreError(ValueError):
    """A feature store cannot be created, opened or written as asked; the message names the path."""


class NotAStoreError(StoreError):
    """The path holds no amflow feature store."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened with ``mode="r"``."""


class FingerprintMismatch(StoreError):
    """The store was made from other settings than the ones asked for; names each differing field."""


class ShardBusyError(StoreError):
    """Another writer holds the shard (two writers inside one shard would lose data)."""


class NonFiniteFeaturesError(StoreError):
    """A clip's features hold NaN/inf in the stored dtype (recorded as a failed clip by extraction)."""


def nonfinite_mask(values: np.ndarray) -> np.ndarray:
    """Boolean mask of NaN/inf entries; for float16 via the exponent bits (np.isfinite is ~30x slower)."""
    if values.dtype == np.float16:
        return (np.ascontiguousarray(values).view(np.uint16) & 0x7C00) == 0x7C00
    return ~np.isfinite(values)

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


def has_nonfinite(values: np.ndarray) -> bool:
    """Whether any entry is NaN/inf; for float16 one masked maximum of the bits (no boolean array):
    a value is non-finite when its bits without the sign are at least inf's, 0x7C00. Values without a
    sign bit (ReLU-pooled embeddings, flow maps) need only the plain maximum (no masked copy)."""
    if values.dtype == np.float16:
        bits = np.ascontiguousarray(values).view(np.uint16)
        if bits.size == 0 or int(bits.max()) < 0x7C00:
            return False
        return int(np.bitwise_and(bits, 0x7FFF).max()) >= 0x7C00
    return not np.isfinite(values).all()


def fill_nan(arr: np.ndarray, rows: np.ndarray | int | slice | None = None) -> np.ndarray:
    """Sets ``arr`` (or ``arr[rows]``) to NaN in place by writing NaN's bit pattern as integers: filling a
    float16 array with the float NaN converts the scalar per element (~3x slower); returns ``arr``."""
    ints = arr.view(f"u{arr.itemsize}")
    nan = np.array(np.nan, dtype=arr.dtype).view(ints.dtype)[()]
    if rows is None:
        ints.fill(nan)
    else:
        ints[rows] = nan
    return arr

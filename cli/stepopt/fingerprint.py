"""Parameter fingerprints (``sha256:...``) that schedules record; numpy only, tensors accepted."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from stepopt._lazy import is_tensor


def fingerprint_arrays(arrays: Iterable[Any]) -> str:
    """``sha256:<hex>`` over the arrays' shapes, dtypes and little-endian C-order bytes."""
    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if is_tensor(a) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()

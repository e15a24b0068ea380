"""The int8 KV cache's rows in numpy: what segue.CausalAttention8 keeps (engine/native_attention_kernel.h).

A position's keys (or values) of one head are `head_dim` signed bytes followed by the four bytes of a
float32 scale: the largest magnitude becomes 127, each number the nearest multiple of the scale, ties to
even. `quantize` makes the rows the operator writes, bit for bit (the same float32 operations), for a
history built elsewhere; `widen` reads them back as floats.
"""

from __future__ import annotations

import numpy as np

SCALE_BYTES = 4  # a row's float32 scale, after its bytes
LARGEST = np.float32(127.0)


def row_width(head_dim: int) -> int:
    """Bytes of one position of one head."""
    return head_dim + SCALE_BYTES


def quantize(tensor: np.ndarray) -> np.ndarray:
    """[..., head_dim] floats as int8 rows [..., head_dim + 4]."""
    floats = np.asarray(tensor, dtype=np.float32)
    most = np.abs(floats).max(axis=-1, keepdims=True, initial=np.float32(0.0))
    with np.errstate(divide="ignore"):
        inverse = np.where(most > 0, LARGEST / most, np.float32(0.0)).astype(np.float32)
    rows = np.empty((*floats.shape[:-1], row_width(floats.shape[-1])), dtype=np.int8)
    rows[..., :-SCALE_BYTES] = np.rint(floats * inverse)
    rows[..., -SCALE_BYTES:] = (most / LARGEST).astype("<f4").view(np.int8)
    return rows


def widen(rows: np.ndarray) -> np.ndarray:
    """int8 rows [..., head_dim + 4] as the floats they stand for [..., head_dim]."""
    rows = np.ascontiguousarray(rows, dtype=np.int8)
    scales = rows[..., -SCALE_BYTES:].copy().view("<f4")
    return rows[..., :-SCALE_BYTES].astype(np.float32) * scales

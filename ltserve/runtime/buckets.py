"""The batch sizes a model runs at: a batch is padded up to the next bucket, so a serving process meets only the
shapes it warmed up (cuDNN re-plans per shape on GPU; CUDA graphs are captured per shape)."""

from __future__ import annotations

import numpy as np


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself.

    Example: 32 -> [1, 2, 4, 8, 16, 32]; 24 -> [1, 2, 4, 8, 16, 24].
    """
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch_size)
    return buckets


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest bucket that holds `n` images (the largest bucket when none does)."""
    return next((b for b in buckets if b >= n), buckets[-1])


def pad_to(chunk: np.ndarray, n: int) -> np.ndarray:
    """`chunk` (B, ...) padded with zero rows to n >= B rows (the padding rows' outputs are sliced off after)."""
    if len(chunk) >= n:
        return chunk
    return np.concatenate([chunk, np.zeros((n - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)])

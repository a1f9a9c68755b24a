"""Chunk-level zigzag token layout for prefill context parallelism.

A prompt of N tokens is padded to N_pad, a multiple of 2·C·align, and cut into 2C chunks of
Lc = N_pad / 2C tokens. Rank r holds chunks r and 2C-1-r, in that order, so every rank has the same
share of causal-attention work. Arrays in "zigzag order" have their token axis permuted so that an even
split of it over the `cp` mesh axis gives each rank its pair of chunks.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jax import lax

ALIGN = 64  # the GDN chunk: every zigzag chunk holds whole GDN chunks


def padded_length(n: int, cp: int, align: int = ALIGN) -> int:
    unit = 2 * cp * align
    return max(unit, -(-n // unit) * unit)


def chunk_order(cp: int) -> np.ndarray:
    """Global chunk ids in zigzag order: [0, 2C-1, 1, 2C-2, ..., C-1, C]."""
    return np.stack([np.arange(cp), 2 * cp - 1 - np.arange(cp)], axis=1).reshape(-1)


def token_permutation(n_pad: int, cp: int) -> np.ndarray:
    """perm[i] = global position of the i-th token in zigzag order."""
    lc = n_pad // (2 * cp)
    return (chunk_order(cp)[:, None] * lc + np.arange(lc)[None, :]).reshape(-1)


def to_zigzag(x, cp: int, axis: int = 1):
    """Permute the token axis (length N_pad) of x from natural to zigzag order."""
    return jnp.take(x, jnp.asarray(token_permutation(x.shape[axis], cp)), axis=axis)


def from_zigzag(x, cp: int, axis: int = 1):
    """Inverse of `to_zigzag`."""
    inv = np.argsort(token_permutation(x.shape[axis], cp))
    return jnp.take(x, jnp.asarray(inv), axis=axis)


def local_positions(rank, cp: int, chunk_len: int):
    """Global positions [2·Lc] of the tokens rank `rank` (traced or static) holds."""
    offs = jnp.arange(chunk_len, dtype=jnp.int32)
    first = rank * chunk_len + offs
    second = (2 * cp - 1 - rank) * chunk_len + offs
    return jnp.concatenate([first, second])


def rank_index(axis: str, cp: int):
    return lax.axis_index(axis) if cp > 1 else jnp.int32(0)

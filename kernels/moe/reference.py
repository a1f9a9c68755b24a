"""Grouped matmul for MoE on XLA's CPU/GPU backends: a sorted, tile-padded matmul whose work is that of
the routed rows only (plus at most one partial tile per expert), never a dense all-experts product.

`grouped_matmul(lhs, rhs, group_sizes)`: lhs [M, K] rows sorted by group (group e owns
`group_sizes[e]` consecutive rows; rows past sum(group_sizes) are ignored and return 0),
rhs [E, K, N], returns [M, N] with row r = lhs[r] @ rhs[group(r)]. Accumulation in fp32, output in
lhs dtype.

How: rows are scattered into a buffer where every group starts on a tile boundary (so a tile never
straddles two experts), then a loop over tiles multiplies each [tile, K] block by its one expert's
[K, N] weights. The number of tiles is static: ceil(M / tile) + E bounds it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

TILE = 64


def tile_layout(group_sizes, num_rows: int, tile: int):
    """Where each sorted row lands in the tile-padded buffer, and the expert of each tile.
    Returns (dest [M] int32 row index in the padded buffer, tile_group [num_tiles] int32, num_tiles)."""
    E = group_sizes.shape[0]
    num_tiles = -(-num_rows // tile) + E
    padded = ((group_sizes + tile - 1) // tile) * tile
    pad_start = jnp.cumsum(padded) - padded  # padded offset of each group
    start = jnp.cumsum(group_sizes) - group_sizes  # unpadded offset of each group
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    group_of_row = jnp.clip(jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right"), 0, E - 1)
    dest = (pad_start[group_of_row] + rows - start[group_of_row]).astype(jnp.int32)
    valid = rows < jnp.sum(group_sizes)
    dest = jnp.where(valid, dest, num_tiles * tile)  # out of range: dropped by scatter
    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tile
    tile_group = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right"), 0, E - 1)
    return dest, tile_group.astype(jnp.int32), num_tiles


def grouped_matmul(lhs, rhs, group_sizes, *, tile: int = TILE):
    M, K = lhs.shape
    E, _, N = rhs.shape
    dest, tile_group, num_tiles = tile_layout(group_sizes.astype(jnp.int32), M, tile)
    buf = jnp.zeros((num_tiles * tile, K), lhs.dtype).at[dest].set(lhs, mode="drop")
    tiles = buf.reshape(num_tiles, tile, K)

    def one_tile(_, xs):
        x, e = xs
        w = lax.dynamic_index_in_dim(rhs, e, axis=0, keepdims=False)  # [K, N]
        return None, jnp.dot(x, w, preferred_element_type=jnp.float32).astype(lhs.dtype)

    _, out = lax.scan(one_tile, None, (tiles, tile_group))
    out = out.reshape(num_tiles * tile, N)
    return jnp.take(out, dest, axis=0, mode="fill", fill_value=0)

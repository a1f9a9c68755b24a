"""Grouped matmul for MoE on XLA's CPU/GPU backends: a sorted, tile-padded matmul whose work is that of
the routed rows only (plus at most one partial tile per expert), never a dense all-experts product.

`grouped_matmul(lhs, rhs, group_sizes)`: lhs [M, K] rows sorted by group (group e owns
`group_sizes[e]` consecutive rows; rows past sum(group_sizes) are ignored and return 0),
rhs [E, K, N], returns [M, N] with row r = lhs[r] @ rhs[group(r)]. Accumulation in fp32, output in
lhs dtype.

How: rows are scattered into a buffer where every group starts on a tile boundary (so a tile never
straddles two experts), then a loop over tiles multiplies each [tile, K] block by its one expert's
[K, N] weights. The number of tiles is static: at most min(E, M) groups are non-empty and each wastes
less than one tile, so ceil(M / tile) + min(E, M) bounds it; tiles past the used ones skip their matmul.
The work is therefore that of the M routed rows plus at most one partial tile per non-empty expert.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

TILE = 64


def num_tiles_bound(num_rows: int, num_groups: int, tile: int) -> int:
    return -(-num_rows // tile) + min(num_groups, num_rows)


def tile_layout(group_sizes, num_rows: int, tile: int):
    """Where each sorted row lands in the tile-padded buffer, and the expert of each tile.
    Returns (dest [M] int32 row index in the padded buffer, tile_group [num_tiles] int32, num_tiles)."""
    E = group_sizes.shape[0]
    num_tiles = num_tiles_bound(num_rows, E, tile)
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
    used = jnp.sum(padded) // tile
    return dest, tile_group.astype(jnp.int32), num_tiles, used


def grouped_matmul(lhs, rhs, group_sizes, *, tile: int = TILE):
    M, K = lhs.shape
    E, _, N = rhs.shape
    dest, tile_group, num_tiles, used = tile_layout(group_sizes.astype(jnp.int32), M, tile)
    buf = jnp.zeros((num_tiles * tile, K), lhs.dtype).at[dest].set(lhs, mode="drop")
    tiles = buf.reshape(num_tiles, tile, K)

    def one_tile(_, xs):
        x, e, i = xs
        w = lax.dynamic_index_in_dim(rhs, e, axis=0, keepdims=False)  # [K, N]
        y = lax.cond(i < used, lambda: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(lhs.dtype),
                     lambda: jnp.zeros((tile, N), lhs.dtype))
        return None, y

    _, out = lax.scan(one_tile, None, (tiles, tile_group, jnp.arange(num_tiles)))
    out = out.reshape(num_tiles * tile, N)
    return jnp.take(out, dest, axis=0, mode="fill", fill_value=0)

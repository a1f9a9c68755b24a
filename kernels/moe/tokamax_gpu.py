"""`grouped_matmul` on Hopper through `tokamax.ragged_dot` (implementation "mosaic", Mosaic GPU).

Contract: reference.grouped_matmul. lhs [M, K] rows sorted by group, rhs [E, K, N], group_sizes [E] int;
returns [M, N] in lhs's dtype, row r = lhs[r] @ rhs[group(r)], rows past sum(group_sizes) are 0.
Accumulation in fp32 inside the kernel. The work is that of the routed rows (tiles of one expert), never
the dense all-experts product that `jax.lax.ragged_dot` lowers to on XLA.
bf16/fp16 operands only (NotImplementedError otherwise: api.py falls back for kernels="auto").
"""

from __future__ import annotations

import jax.numpy as jnp

ROW_TILE = 8  # the Mosaic kernel's row tiling: M must be at most this or a multiple of it


def check_supported(lhs, rhs) -> None:
    if lhs.dtype not in (jnp.bfloat16, jnp.float16) or rhs.dtype != lhs.dtype:
        raise NotImplementedError(
            f"tokamax ragged_dot: lhs {lhs.dtype} / rhs {rhs.dtype}; the Mosaic GPU kernel takes matching "
            "bf16/fp16 operands")


def grouped_matmul(lhs, rhs, group_sizes):
    check_supported(lhs, rhs)
    import tokamax  # lazily: GPU installs only

    group_sizes = group_sizes.astype(jnp.int32)
    rows = lhs.shape[0]
    # The kernel tiles rows by 8: fewer rows than a tile, or a multiple, only (decode of a top-10 model
    # has B·10). Padding rows lie past the last group, so they are not computed, and are cut off below.
    padded = rows if rows <= ROW_TILE or rows % ROW_TILE == 0 else -(-rows // ROW_TILE) * ROW_TILE
    if padded != rows:
        lhs = jnp.pad(lhs, ((0, padded - rows), (0, 0)))
    out = tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype, implementation="mosaic")
    out = out[:rows]
    # The kernel does not promise to write rows past the last group: the contract says they are 0.
    routed = jnp.arange(rows, dtype=jnp.int32) < jnp.sum(group_sizes)
    return jnp.where(routed[:, None], out, jnp.zeros((), out.dtype))

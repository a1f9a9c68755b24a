"""Weight-only FP8 matmuls on Hopper through tokamax's quantized `ragged_dot` (Mosaic GPU, sm90).

Contract: reference.py, activations="weights", except that the weight scales are rounded to x's dtype before
the kernel multiplies them in: tokamax's sm90 kernel (pallas_mosaic_gpu_kernel_sm90_quant) loads each e4m3
block of the weight into registers, upcasts it to the scales' dtype, multiplies by the per-column scale of the
block and issues a bf16 wgmma with the activations, fp32 accumulation. So the weight is read from memory as one
byte per element, the point of weight-only FP8 for decode. Its scales are one per (128 contraction rows, output
column): the checkpoints' [N/bn, K/bk] blocks are repeated over the bn columns of each block. tokamax takes the
weight as [E, K, N] and reads it as [E, N, K] (K-major, as our FP8 weights are stored), so it gets the transpose
of ours and XLA folds the two transposes away (its heuristics read the contraction tile of a [E, K, N] scale).
Error over the reference: one more bf16 rounding (of the scale) per weight block, relative 2^-9 at most.
"""

from __future__ import annotations

import jax.numpy as jnp

ROW_TILE = 8  # rows must be at most this or a multiple of it (as for the unquantized kernel: moe/tokamax_gpu.py)


def _check(lhs, values, block) -> None:
    if lhs.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"tokamax quantized ragged_dot: activations {lhs.dtype}; it takes bf16/fp16")
    N, K = values.shape[-2:]
    if K % block[1] or N % block[0] or block[1] % 64:
        raise NotImplementedError(f"tokamax quantized ragged_dot: weight [{N}, {K}] in blocks {block}: needs whole "
                                  f"blocks and a contraction block that is a multiple of 64")


def grouped_matmul(lhs, values, scale, block, group_sizes):
    """lhs [M, K] sorted by expert, values [E, N, K] e4m3 / scale [E, N/bn, K/bk] -> [M, N] in lhs's dtype;
    rows past sum(group_sizes) are 0."""
    _check(lhs, values, block)
    import qwix  # lazily: GPU installs only (a tokamax dependency)
    import tokamax

    rows = lhs.shape[0]
    padded = rows if rows <= ROW_TILE or rows % ROW_TILE == 0 else -(-rows // ROW_TILE) * ROW_TILE
    if padded != rows:
        lhs = jnp.pad(lhs, ((0, padded - rows), (0, 0)))
    column_scale = jnp.repeat(scale, block[0], axis=1).astype(lhs.dtype)  # [E, N, K/bk]
    rhs = qwix.QArray(qvalue=jnp.swapaxes(values, 1, 2), scale=jnp.swapaxes(column_scale, 1, 2),
                      qtype=jnp.float8_e4m3fn)  # [E, K, N], scale tile (1, bk, 1)
    out = tokamax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=lhs.dtype,
                             implementation="mosaic")[:rows]
    routed = jnp.arange(rows, dtype=jnp.int32) < jnp.sum(group_sizes)
    return jnp.where(routed[:, None], out, jnp.zeros((), out.dtype))


def matmul(x, values, scale, block):
    """x [..., K] times one FP8 weight values [N, K] / scale [N/bn, K/bk] -> [..., N]: a ragged dot of one
    group holding every row."""
    K, N = x.shape[-1], values.shape[0]
    rows = x.reshape(-1, K)
    out = grouped_matmul(rows, values[None], scale[None], block, jnp.array([rows.shape[0]], jnp.int32))
    return out.reshape(*x.shape[:-1], N)

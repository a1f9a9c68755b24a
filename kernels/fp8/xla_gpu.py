"""w8a8 FP8 matmuls in plain XLA: one FP8 dot per 128-channel block of the contraction.

Contract: reference.py, activations="dynamic". XLA's FP8 dot (`lax.dot_general` on float8_e4m3fn operands,
fp32 result: cuBLASLt's FP8 GEMM on Hopper) scales a whole operand by one number, while the checkpoints'
scales change every 128 channels of the contraction (and every 128 output columns). So the contraction is cut
into its K/bk blocks: per block one FP8 dot [M, bk] x [bk, N], multiplied by the activation scales of the block
(per row) and the weight scales (per bn columns), accumulated in fp32 (a `lax.scan` over the blocks, so the
[M, N] fp32 accumulator is the only temporary). Each block's dot has a contraction of only bk = 128, and the
accumulator is read and written once per block: benchmarks/fp8.py measures what that costs against bf16.
Shapes whose K or N are not multiples of the block raise NotImplementedError (api.py then runs the reference).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import reference
from ..moe import reference as moe_reference


def _check(K: int, N: int, block) -> None:
    bn, bk = block
    if K % bk or N % bn:
        raise NotImplementedError(f"XLA FP8 dot per block: K={K}, N={N} must be multiples of the block {block}")


def _blocked_product(xq, sx, values, scale, block):
    """xq [M, K] e4m3, sx [M, K/bk] f32, values [N, K] e4m3, scale [N/bn, K/bk] f32 -> [M, N] fp32."""
    bn, bk = block
    M, K = xq.shape
    col_scale = jnp.repeat(scale, bn, axis=0)  # [N, K/bk]

    def step(acc, kb):
        xb = lax.dynamic_slice_in_dim(xq, kb * bk, bk, axis=1)
        wb = lax.dynamic_slice_in_dim(values, kb * bk, bk, axis=1)
        part = lax.dot_general(xb, wb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        sa = lax.dynamic_index_in_dim(sx, kb, axis=1, keepdims=True)          # [M, 1]
        sw = lax.dynamic_index_in_dim(col_scale, kb, axis=1, keepdims=False)  # [N]
        return acc + part * sa * sw[None, :], None

    acc, _ = lax.scan(step, jnp.zeros((M, values.shape[0]), jnp.float32), jnp.arange(K // bk))
    return acc


def matmul_w8a8(x, values, scale, block):
    """x [..., K], FP8 weight values [N, K] / scale -> [..., N] in x's dtype (w8a8, reference.matmul)."""
    K, N = x.shape[-1], values.shape[0]
    _check(K, N, block)
    xq, sx = reference.quantize_activations(x.reshape(-1, K), block[1])
    return _blocked_product(xq, sx, values, scale, block).astype(x.dtype).reshape(*x.shape[:-1], N)


def grouped_matmul_w8a8(lhs, values, scale, block, group_sizes, tile: int = moe_reference.TILE):
    """lhs [M, K] sorted by expert, experts values [E, N, K] / scale -> [M, N] (w8a8, reference.grouped_matmul):
    rows quantized per token, then the tile-padded layout of moe.reference with each tile's product
    computed block by block as in `matmul_w8a8`."""
    M, K = lhs.shape
    E, N, _ = values.shape
    _check(K, N, block)
    xq, sx = reference.quantize_activations(lhs, block[1])
    dest, tile_group, num_tiles, used = moe_reference.tile_layout(group_sizes.astype(jnp.int32), M, tile)
    pad = lambda a: jnp.zeros((num_tiles * tile,) + a.shape[1:], a.dtype).at[dest].set(a, mode="drop")
    xt = pad(xq).reshape(num_tiles, tile, K)
    st = pad(sx).reshape(num_tiles, tile, -1)

    def one_tile(_, xs):
        x, s, e, i = xs
        w = lax.dynamic_index_in_dim(values, e, axis=0, keepdims=False)
        ws = lax.dynamic_index_in_dim(scale, e, axis=0, keepdims=False)
        y = lax.cond(i < used, lambda: _blocked_product(x, s, w, ws, block).astype(lhs.dtype),
                     lambda: jnp.zeros((tile, N), lhs.dtype))
        return None, y

    _, out = lax.scan(one_tile, None, (xt, st, tile_group, jnp.arange(num_tiles)))
    return jnp.take(out.reshape(num_tiles * tile, N), dest, axis=0, mode="fill", fill_value=0)

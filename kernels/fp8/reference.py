"""FP8 matmuls with block-scaled e4m3 weights: the contract and the plain-jnp implementation.

Weights are stored as the released FP8 checkpoints store them, output-major: values [..., N, K] float8_e4m3fn
and `scale` [..., ceil(N/bn), ceil(K/bk)] float32 (`weight_scale_inv`), the real weight being
values[n, k] · scale[n // bn, k // bk] (`block` = (bn, bk), (128, 128) in every release; a smaller block where a
tp rank holds part of one: pcp_jax.parallel.tensor). Two ways to multiply activations x [..., K] by it:

- "weights" (weight-only): the weight is dequantized per block in fp32 and rounded once to x's dtype; the
  product is x's dtype times that, accumulated in fp32, rounded once to x's dtype. In bfloat16 this is the
  bf16 model whose weights are the dequantized checkpoint (error: bf16 rounding of the weights and output).
- "dynamic" (w8a8, the checkpoints' `activation_scheme`): each token's activations are quantized per group of
  bk channels (`quantize_activations`: scale = amax / 448, values rounded to nearest e4m3), then
  y[m, n] = Σ_k x_q[m, k] · sx[m, k // bk] · w_q[n, k] · sw[n // bn, k // bk], accumulated in fp32, rounded
  once to x's dtype. Its extra error over "weights" is the e4m3 rounding of the activations (a relative
  2^-4 per element at most, about 2-3% relative L2 on a product of random activations).

Here both are computed from the dequantized operands in fp32 at the highest precision: exact up to the order
of fp32 accumulation (what the GPU implementations of api.py are tested against). `quantize` makes FP8
weights from real ones (random weights of the benchmarks, tests), as transformers' FineGrainedFP8 quantizer
does: per block scale_inv = amax / 448 (1 for an all-zero block), values = clip(w / scale_inv) in e4m3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..moe import reference as moe_reference

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0                 # largest finite e4m3 (fn) value
BLOCK = (128, 128)               # the released checkpoints' weight_block_size
ACTIVATION_MODES = ("weights", "dynamic")
_MIN_AMAX = 1e-12                # an all-zero activation group gets this amax (its values stay 0)


def _expand(scale, block, shape):
    """scale [..., ceil(R/br), ceil(C/bc)] repeated over its blocks and cut to `shape` [..., R, C]."""
    br, bc = block
    full = jnp.repeat(jnp.repeat(scale, br, axis=-2), bc, axis=-1)
    return full[..., :shape[-2], :shape[-1]]


def dequantize(values, scale, block, dtype):
    """values [..., R, C] e4m3 · scale per `block` (fp32 product), rounded once to `dtype`."""
    return (values.astype(jnp.float32) * _expand(scale.astype(jnp.float32), block, values.shape)).astype(dtype)


def quantize(w, block=BLOCK):
    """Real weights [..., R, C] -> (values e4m3 [..., R, C], scale f32 [..., ceil(R/br), ceil(C/bc)])."""
    br, bc = block
    *lead, R, C = w.shape
    Rp, Cp = -(-R // br) * br, -(-C // bc) * bc
    wf = jnp.pad(w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, Rp - R), (0, Cp - C)])
    blocks = wf.reshape(*lead, Rp // br, br, Cp // bc, bc)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
    values = jnp.clip(wf / _expand(scale, block, wf.shape), -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return values[..., :R, :C], scale


def quantize_activations(x, group: int):
    """x [..., K] -> (x_q e4m3 [..., K], scale f32 [..., ceil(K/group)]): per token and group of `group`
    channels, scale = amax / 448 and x_q = x / scale rounded to the nearest e4m3."""
    K = x.shape[-1]
    Kp = -(-K // group) * group
    xf = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, Kp - K)])
    groups = xf.reshape(*x.shape[:-1], Kp // group, group)
    scale = jnp.maximum(jnp.max(jnp.abs(groups), axis=-1), _MIN_AMAX) / E4M3_MAX
    q = jnp.clip(groups / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q.reshape(*x.shape[:-1], Kp)[..., :K], scale


def _check(values, scale, block, activations):
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations={activations!r}; expected one of {ACTIVATION_MODES}")
    if values.dtype != E4M3:
        raise ValueError(f"FP8 weights must be float8_e4m3fn; got {values.dtype}")
    want = tuple(-(-d // b) for d, b in zip(values.shape[-2:], block))
    if scale.shape[-2:] != want or scale.shape[:-2] != values.shape[:-2]:
        raise ValueError(f"scale of shape {scale.shape} does not cover weights {values.shape} in blocks {block}")


def activations_fp32(x, group: int):
    """x as the w8a8 product sees it, in fp32: quantized per token and group, then scaled back."""
    q, s = quantize_activations(x, group)
    return q.astype(jnp.float32) * jnp.repeat(s, group, axis=-1)[..., :x.shape[-1]]


def matmul(x, values, scale, block, activations: str = "weights"):
    """x [..., K] times the FP8 weight (values [N, K], scale per `block`) -> [..., N] in x's dtype (module
    docstring)."""
    _check(values, scale, block, activations)
    if activations == "weights":
        w = dequantize(values, scale, block, x.dtype)
        return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x.dtype)
    xf = activations_fp32(x, block[1])
    w = dequantize(values, scale, block, jnp.float32)
    return lax.dot_general(xf, w, (((x.ndim - 1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32).astype(x.dtype)


def grouped_matmul(lhs, values, scale, block, group_sizes, activations: str = "weights"):
    """lhs [M, K] rows sorted by expert, FP8 experts values [E, N, K] / scale [E, ceil(N/bn), ceil(K/bk)],
    group_sizes [E] -> [M, N] in lhs's dtype: row r times its expert's weight (the numerics of `matmul`);
    rows past sum(group_sizes) are 0 (the contract of pcp_jax.kernels.moe.reference.grouped_matmul)."""
    _check(values, scale, block, activations)
    if activations == "weights":
        w = jnp.swapaxes(dequantize(values, scale, block, lhs.dtype), 1, 2)
        return moe_reference.grouped_matmul(lhs, w, group_sizes)
    w = jnp.swapaxes(dequantize(values, scale, block, jnp.float32), 1, 2)
    with jax.default_matmul_precision("highest"):
        return moe_reference.grouped_matmul(activations_fp32(lhs, block[1]), w, group_sizes).astype(lhs.dtype)

"""Public FP8 matmuls: the model's projections and MoE experts with block-scaled e4m3 weights.
Contract and numerics: reference.py (weights output-major [..., N, K] with `weight_scale_inv` blocks).

`activations`: "weights" (weight-only: dequantize, bf16 math, fp32 accumulation) or "dynamic" (w8a8: per-token,
per-128-channel e4m3 activations). Which implementation runs (backend.first_that_runs), on a GPU backend:
- dense, weight-only: for at most DECODE_ROWS rows (decode), tokamax's quantized ragged_dot with one group
  (reads the weight as one byte per element); then XLA (dequantize per block, then the bf16 dot);
- dense, w8a8: XLA FP8 dots per 128-channel block (xla_gpu.py);
- experts, weight-only: tokamax's quantized ragged_dot; then the experts dequantized to bf16 for our Mosaic GPU
  grouped matmul (kernels/moe/mosaic_gpu.py);
- experts, w8a8: the tile-padded grouped matmul of XLA FP8 dots per block (xla_gpu.py).
Elsewhere (CPU, kernels="jnp") the jnp reference runs. benchmarks/fp8.py compares them on an H200.

What exists, evaluated before writing anything (jax 0.11.2 / 0.12, tokamax 0.0.17, qwix 0.1.8): XLA's FP8 dot
(float8_e4m3fn operands, fp32 result: cuBLASLt's FP8 GEMM) scales each operand by one number, so the 128-blocks
need one dot per contraction block (xla_gpu.py); `jax.nn.scaled_matmul` takes 1-D block scales along the
contraction (our w8a8 exactly, with the weight's block scales repeated over its rows), but its cuDNN kernel is
for Blackwell's MXFP8/NVFP4 only, and on Hopper XLA expands it into dequantize + dot (no FP8 math); qwix's
subchannel dot_general is a batched dot per block followed by a scaled sum (xla_gpu.py's math with the [K/128,
M, N] partial products materialized); tokamax's sm90 ragged_dot takes a quantized weight only (dequantized in
the kernel: weight-only), its FP8 x FP8 kernels are for sm100. So weight-only has a Hopper kernel (tokamax) and
w8a8 runs through XLA; a w8a8 Mosaic GPU kernel (wgmma on e4m3, scales applied per 128-block of the
contraction) is what would bring the FP8 tensor cores' rate to prefill.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..backend import first_that_runs, use_gpu_kernels
from . import reference

DECODE_ROWS = 64  # at most this many rows: the weight's bytes dominate (tokamax's sm90 tiles are 64 rows)


def matmul(x, values, scale, block, *, activations: str = "weights", kernels: str = "auto"):
    """x [..., K] times the FP8 weight values [N, K] / scale [ceil(N/bn), ceil(K/bk)] -> [..., N] in x's
    dtype."""
    implementations = []
    if use_gpu_kernels(kernels):
        from . import tokamax_gpu, xla_gpu

        if activations == "weights":
            xla = ("XLA dequantize + dot", lambda: reference.matmul(x, values, scale, block, "weights"))
            implementations = [xla]
            if math.prod(x.shape[:-1]) <= DECODE_ROWS:
                implementations = [("tokamax quantized ragged_dot",
                                    lambda: tokamax_gpu.matmul(x, values, scale, block)), xla]
        else:
            implementations = [("XLA FP8 dot per block", lambda: xla_gpu.matmul_w8a8(x, values, scale, block))]
    return first_that_runs(f"FP8 matmul ({activations})", kernels, implementations,
                           lambda: reference.matmul(x, values, scale, block, activations))


def grouped_matmul(lhs, values, scale, block, group_sizes, *, activations: str = "weights", kernels: str = "auto"):
    """lhs [M, K] rows sorted by expert, experts values [E, N, K] / scale [E, ceil(N/bn), ceil(K/bk)],
    group_sizes [E] -> [M, N] in lhs's dtype (rows past sum(group_sizes) are 0)."""
    implementations = []
    if use_gpu_kernels(kernels):
        from ..moe import mosaic_gpu
        from . import tokamax_gpu, xla_gpu

        if activations == "weights":
            dequantized = lambda: jnp.swapaxes(reference.dequantize(values, scale, block, lhs.dtype), 1, 2)
            implementations = [
                ("tokamax quantized ragged_dot",
                 lambda: tokamax_gpu.grouped_matmul(lhs, values, scale, block, group_sizes)),
                ("dequantize + our Mosaic GPU kernel",
                 lambda: mosaic_gpu.grouped_matmul(lhs, dequantized(), group_sizes))]
        else:
            implementations = [("XLA FP8 dot per block",
                                lambda: xla_gpu.grouped_matmul_w8a8(lhs, values, scale, block, group_sizes))]
    return first_that_runs(f"FP8 grouped_matmul ({activations})", kernels, implementations,
                           lambda: reference.grouped_matmul(lhs, values, scale, block, group_sizes, activations))


def grouped_swiglu(lhs, gate, up, block, group_sizes, *, activations: str = "weights", kernels: str = "auto"):
    """silu(lhs @ gate[e]) * (lhs @ up[e]) per row, gate and up each (values [E, I, K], scale): [M, I] in lhs's
    dtype; each product rounded to lhs's dtype first (two grouped matmuls)."""
    product = lambda w: grouped_matmul(lhs, *w, block, group_sizes, activations=activations, kernels=kernels)
    return jax.nn.silu(product(gate)) * product(up)

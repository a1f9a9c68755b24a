"""Public grouped matmuls for MoE. Contract: reference.py (rows sorted by expert, work ~ routed rows).

On a GPU backend (see backend.use_gpu_kernels) they run our Pallas Mosaic GPU kernel (mosaic_gpu.py:
warp-specialized, persistent; gate, up and SwiGLU fused in `grouped_swiglu`), and where it does not take the
shape, `tokamax.ragged_dot` (tokamax_gpu.py); never `jax.lax.ragged_dot` (a dense masked matmul over every
expert on XLA). Which one runs: backend.first_that_runs (our kernel, then tokamax, then the jnp reference).
"""

from __future__ import annotations

import functools

import jax

from ..backend import first_that_runs, use_gpu_kernels
from . import reference


# Each op is its own jitted function: a program that calls it several times with the same shapes (the layers
# of a scanned group, every layer of an unrolled decode) traces and lowers its kernels once.
@functools.partial(jax.jit, static_argnames=("kernels",))
def grouped_matmul(lhs, rhs, group_sizes, *, kernels="auto"):
    """lhs [M, K] sorted by group, rhs [E, K, N], group_sizes [E] -> [M, N]."""
    implementations = []
    if use_gpu_kernels(kernels):
        from . import mosaic_gpu, tokamax_gpu

        implementations = [("our Mosaic GPU kernel", lambda: mosaic_gpu.grouped_matmul(lhs, rhs, group_sizes)),
                           ("tokamax ragged_dot", lambda: tokamax_gpu.grouped_matmul(lhs, rhs, group_sizes))]
    return first_that_runs("MoE grouped_matmul", kernels, implementations,
                           lambda: reference.grouped_matmul(lhs, rhs, group_sizes))


@functools.partial(jax.jit, static_argnames=("kernels",))
def grouped_swiglu(lhs, w_gate, w_up, group_sizes, *, kernels="auto"):
    """silu(lhs @ w_gate[e]) * (lhs @ w_up[e]) per row: lhs [M, K] sorted by group, w_gate/w_up [E, K, I] ->
    [M, I] in lhs's dtype. Our GPU kernel keeps both products in fp32 and rounds once; the unfused paths
    (tokamax, jnp) round each product to lhs's dtype first, as two grouped matmuls do."""
    unfused = lambda gmm: jax.nn.silu(gmm(lhs, w_gate, group_sizes)) * gmm(lhs, w_up, group_sizes)
    implementations = []
    if use_gpu_kernels(kernels):
        from . import mosaic_gpu, tokamax_gpu

        implementations = [
            ("our Mosaic GPU kernel", lambda: mosaic_gpu.grouped_swiglu(lhs, w_gate, w_up, group_sizes)),
            ("tokamax ragged_dot", lambda: unfused(tokamax_gpu.grouped_matmul))]
    return first_that_runs("MoE grouped_swiglu", kernels, implementations,
                           lambda: unfused(reference.grouped_matmul))

"""Public grouped matmuls for MoE. Contract: reference.py (rows sorted by expert, work ~ routed rows).

On a GPU backend (see backend.use_gpu_kernels) they run our Pallas Mosaic GPU kernel (mosaic_gpu.py:
warp-specialized, persistent; gate, up and SwiGLU fused in `grouped_swiglu`), and where it does not take the
shape, `tokamax.ragged_dot` (tokamax_gpu.py); never `jax.lax.ragged_dot` (a dense masked matmul over every
expert on XLA). A backend that does not take the inputs (e.g. fp32) raises NotImplementedError: with
kernels="auto" we log the reason once and go on to the next (last: the jnp reference); with kernels="gpu" the
error of the last GPU backend propagates.
"""

from __future__ import annotations

import functools
import logging

import jax

from ..backend import use_gpu_kernels
from . import reference


@functools.cache
def _log_fallback(op: str, backend: str, reason: str) -> None:
    logging.getLogger(__name__).warning("MoE %s: %s unavailable (%s); trying the next backend", op, backend, reason)


def _first_that_runs(op: str, attempts, kernels: str):
    """attempts: (name, thunk) GPU backends in order of preference. Returns the first result, or None when
    every one raised NotImplementedError (kernels="auto"); kernels="gpu" re-raises the last one's error."""
    for i, (name, run) in enumerate(attempts):
        try:
            return run()
        except NotImplementedError as e:
            if kernels == "gpu" and i == len(attempts) - 1:
                raise
            _log_fallback(op, name, str(e))
    return None


def grouped_matmul(lhs, rhs, group_sizes, *, kernels="auto"):
    """lhs [M, K] sorted by group, rhs [E, K, N], group_sizes [E] -> [M, N]."""
    if use_gpu_kernels(kernels):
        from . import mosaic_gpu, tokamax_gpu

        out = _first_that_runs("grouped_matmul", [
            ("our Mosaic GPU kernel", lambda: mosaic_gpu.grouped_matmul(lhs, rhs, group_sizes)),
            ("tokamax ragged_dot", lambda: tokamax_gpu.grouped_matmul(lhs, rhs, group_sizes)),
        ], kernels)
        if out is not None:
            return out
    return reference.grouped_matmul(lhs, rhs, group_sizes)


def grouped_swiglu(lhs, w_gate, w_up, group_sizes, *, kernels="auto"):
    """silu(lhs @ w_gate[e]) * (lhs @ w_up[e]) per row: lhs [M, K] sorted by group, w_gate/w_up [E, K, I] ->
    [M, I] in lhs's dtype. Our GPU kernel keeps both products in fp32 and rounds once; the unfused paths
    (tokamax, jnp) round each product to lhs's dtype first, as two grouped matmuls do."""
    unfused = lambda gmm: jax.nn.silu(gmm(lhs, w_gate, group_sizes)) * gmm(lhs, w_up, group_sizes)
    if use_gpu_kernels(kernels):
        from . import mosaic_gpu, tokamax_gpu

        out = _first_that_runs("grouped_swiglu", [
            ("our Mosaic GPU kernel", lambda: mosaic_gpu.grouped_swiglu(lhs, w_gate, w_up, group_sizes)),
            ("tokamax ragged_dot", lambda: unfused(tokamax_gpu.grouped_matmul)),
        ], kernels)
        if out is not None:
            return out
    return unfused(reference.grouped_matmul)

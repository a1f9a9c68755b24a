"""Public grouped matmul for MoE. Contract: reference.py (rows sorted by expert, work ~ routed rows).

On a GPU backend (see backend.use_gpu_kernels) it runs `tokamax.ragged_dot` (Mosaic GPU; tokamax_gpu.py),
never `jax.lax.ragged_dot` (a dense masked matmul over every expert on XLA). Unsupported inputs (e.g.
fp32) raise NotImplementedError there: with kernels="auto" we log the reason once and run the jnp
reference; with kernels="gpu" the error propagates.
"""

from __future__ import annotations

import functools
import logging

from ..backend import use_gpu_kernels
from . import reference


@functools.cache
def _log_fallback(reason: str) -> None:
    logging.getLogger(__name__).warning("MoE: GPU kernel unavailable (%s); running the jnp reference", reason)


def grouped_matmul(lhs, rhs, group_sizes, *, kernels="auto"):
    """lhs [M, K] sorted by group, rhs [E, K, N], group_sizes [E] -> [M, N]."""
    if use_gpu_kernels(kernels):
        from . import tokamax_gpu

        try:
            return tokamax_gpu.grouped_matmul(lhs, rhs, group_sizes)
        except NotImplementedError as e:
            if kernels == "gpu":
                raise
            _log_fallback(str(e))
    return reference.grouped_matmul(lhs, rhs, group_sizes)

"""Public gated-delta-rule ops; the model calls these, never a backend file. Contract: reference.py.

On a GPU backend (see backend.use_gpu_kernels) the chunked forward runs our Pallas kernels
(pallas_gpu.py). A shape they do not support raises NotImplementedError there: with kernels="auto" we log
the reason once and run the jnp reference; with kernels="gpu" the error propagates.
The decode step stays in jnp on every backend: it is one [dk, dv] matrix-vector update per head, memory
bound, and XLA's fused elementwise code already streams the state once (no kernel of ours beats it yet).
"""

from __future__ import annotations

import functools
import logging

from ..backend import use_gpu_kernels
from . import reference


@functools.cache
def _log_fallback(reason: str) -> None:
    logging.getLogger(__name__).warning("GDN: GPU kernel unavailable (%s); running the jnp reference", reason)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, *, scale=None, kernels="auto"):
    """Chunked forward. Returns (o [B, T, Hv, dv], final_state [B, Hv, dk, dv] fp32)."""
    if use_gpu_kernels(kernels):
        from . import pallas_gpu

        try:
            return pallas_gpu.chunk_gated_delta_rule(q, k, v, g, beta, initial_state, scale)
        except NotImplementedError as e:
            if kernels == "gpu":
                raise
            _log_fallback(str(e))
    return reference.chunk_gated_delta_rule(q, k, v, g, beta, initial_state, scale)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, kernels="auto"):
    """One decode token. Returns (o [B, Hv, dv], new state)."""
    use_gpu_kernels(kernels)
    return reference.gated_delta_rule_step(q, k, v, g, beta, state, scale)

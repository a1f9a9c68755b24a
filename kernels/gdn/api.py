"""Public gated-delta-rule ops; the model calls these, never a backend file. Contract: reference.py.

On a GPU backend (see backend.use_gpu_kernels) the chunked forward runs our Pallas kernels
(pallas_gpu.py) where they take the shapes, else the jnp reference (backend.first_that_runs).
The decode step stays in jnp on every backend: it is one [dk, dv] matrix-vector update per head, memory
bound, and XLA's fused elementwise code already streams the state once (no kernel of ours beats it yet).
"""

from __future__ import annotations

import functools

import jax

from ..backend import first_that_runs, use_gpu_kernels
from . import reference


# Each op is its own jitted function: a program that calls it several times with the same shapes (the three
# GDN layers of a scanned group, every layer of an unrolled decode) traces and lowers its kernels once.
@functools.partial(jax.jit, static_argnames=("scale", "kernels"))
def gated_delta_rule(q, k, v, g, beta, initial_state=None, capture=None, *, scale=None, kernels="auto"):
    """Chunked forward. Returns (o [B, T, Hv, dv], final_state [B, Hv, dk, dv] fp32), plus the captured states
    [B, K, Hv, dk, dv] fp32 when `capture` [B, K] (token counts, -1 none: reference.py) is given."""
    implementations = []
    if use_gpu_kernels(kernels):
        from . import pallas_gpu

        implementations = [("our Pallas GDN kernels", lambda: pallas_gpu.chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state, scale, capture=capture))]
    return first_that_runs("GDN chunked forward", kernels, implementations, lambda: reference.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state, scale, capture=capture))


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, kernels="auto"):
    """One decode token. Returns (o [B, Hv, dv], new state)."""
    use_gpu_kernels(kernels)
    return reference.gated_delta_rule_step(q, k, v, g, beta, state, scale)

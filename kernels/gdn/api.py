"""Public gated-delta-rule ops; the model calls these, never a backend file. Contract: reference.py."""

from __future__ import annotations

from ..backend import use_gpu_kernels
from . import reference


def gated_delta_rule(q, k, v, g, beta, initial_state=None, *, scale=None, kernels="auto"):
    """Chunked forward. Returns (o [B, T, Hv, dv], final_state [B, Hv, dk, dv] fp32)."""
    use_gpu_kernels(kernels)  # validates the choice; the GPU kernel is wired in by kernels/gdn/pallas_gpu.py
    return reference.chunk_gated_delta_rule(q, k, v, g, beta, initial_state, scale)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, kernels="auto"):
    """One decode token. Returns (o [B, Hv, dv], new state)."""
    use_gpu_kernels(kernels)
    return reference.gated_delta_rule_step(q, k, v, g, beta, state, scale)

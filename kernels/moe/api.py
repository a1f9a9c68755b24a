"""Public grouped matmul for MoE. Contract: reference.py (rows sorted by expert, work ~ routed rows)."""

from __future__ import annotations

from ..backend import use_gpu_kernels
from . import reference


def grouped_matmul(lhs, rhs, group_sizes, *, kernels="auto"):
    """lhs [M, K] sorted by group, rhs [E, K, N], group_sizes [E] -> [M, N]."""
    use_gpu_kernels(kernels)
    return reference.grouped_matmul(lhs, rhs, group_sizes)

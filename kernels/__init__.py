"""pcp_jax.kernels: ops with a plain-jnp reference and (on Hopper GPUs) faster backends.

Each op is a folder: `reference.py` (the contract and the jnp implementation), `api.py` (the entry the
model calls; picks a backend from `kernels="auto" | "jnp" | "gpu"`), and GPU backends beside them.
"""

from .attention.api import attention_block, merge_partials, merge_stacked
from .backend import KERNEL_CHOICES, use_gpu_kernels
from .gdn.api import gated_delta_rule, gated_delta_rule_step
from .moe.api import grouped_matmul, grouped_swiglu

__all__ = [
    "KERNEL_CHOICES", "attention_block", "gated_delta_rule", "gated_delta_rule_step", "grouped_matmul", "grouped_swiglu",
    "merge_partials", "merge_stacked", "use_gpu_kernels",
]

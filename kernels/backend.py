"""Which implementation an op runs: `kernels="auto" | "jnp" | "gpu"`.

"auto" picks our GPU kernels on a GPU backend and the plain-jnp references elsewhere; "jnp" forces the
references everywhere; "gpu" demands the GPU kernels and fails on other backends.
"""

from __future__ import annotations

import jax

KERNEL_CHOICES = ("auto", "jnp", "gpu")


def use_gpu_kernels(kernels: str) -> bool:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}; expected one of {list(KERNEL_CHOICES)}")
    on_gpu = jax.default_backend() == "gpu"
    if kernels == "gpu" and not on_gpu:
        raise ValueError(f"kernels='gpu' needs a GPU backend; this process runs on {jax.default_backend()!r}")
    return kernels != "jnp" and on_gpu

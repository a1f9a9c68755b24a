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


# Modules the GPU backends import. Some of them register JAX config options when first imported, and
# those options are part of every jitted function's cache key: imported lazily inside the first trace,
# they make the next call of the same function trace and compile again (seen on an H100: a 32-layer
# prefill compiled twice, 70 s lost). Importing them before anything is traced avoids that.
GPU_BACKEND_MODULES = (
    "jax.experimental.pallas.triton",
    "jax.experimental.pallas.mosaic_gpu",
    "tokamax",
    "tokamax._src.ops.attention.pallas_mosaic_gpu",
    "tokamax._src.ops.ragged_dot.pallas_mosaic_gpu",
)


def preload_gpu_backends(kernels: str) -> list[str]:
    """Import the GPU backends' modules now when `kernels` selects them on this backend. Returns the
    modules that could not be imported; nothing is raised here: the op that needs a missing backend
    reports it when traced (kernels="gpu") or falls back to jnp (kernels="auto"), as without preloading."""
    if not use_gpu_kernels(kernels):
        return []
    import importlib

    missing = []
    for name in GPU_BACKEND_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (a broken install must not fail here; see the docstring)
            missing.append(name)
    return missing

"""Which implementation an op runs: `kernels="auto" | "jnp" | "gpu"`.

"auto" picks our GPU kernels on a GPU backend and the plain-jnp references elsewhere; "jnp" forces the
references everywhere; "gpu" demands the GPU kernels and fails on other backends.

Each op's api.py lists its GPU implementations in order of preference and calls `first_that_runs`: the first
that takes the inputs wins. An implementation that does not take them (a dtype, a shape over its limits)
raises NotImplementedError with the reason before doing any work. With kernels="gpu" and none taking them
the op fails naming every reason; with "auto" each reason is logged once and the jnp reference runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax

T = TypeVar("T")

KERNEL_CHOICES = ("auto", "jnp", "gpu")


def use_gpu_kernels(kernels: str) -> bool:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}; expected one of {list(KERNEL_CHOICES)}")
    on_gpu = jax.default_backend() == "gpu"
    if kernels == "gpu" and not on_gpu:
        raise ValueError(f"kernels='gpu' needs a GPU backend; this process runs on {jax.default_backend()!r}")
    return kernels != "jnp" and on_gpu


@functools.cache
def _log_unavailable(op: str, name: str, reason: str, then: str) -> None:
    logging.getLogger(__name__).warning("%s: %s unavailable (%s); %s", op, name, reason, then)


def first_that_runs(op: str, kernels: str, implementations: Sequence[tuple[str, Callable[[], T]]],
                    reference: Callable[[], T]) -> T:
    """The result of the first of `implementations` (name, thunk) that takes its inputs, else of `reference`.

    A thunk that raises NotImplementedError does not take them: its reason is logged once (per op,
    implementation and reason) and the next one runs, the reference last; except under kernels="gpu", where
    the reference never runs: when no implementation is left, NotImplementedError names `op` and every reason.
    Other errors propagate.
    Callers list GPU implementations only where `use_gpu_kernels(kernels)`, so "jnp" (or no GPU) runs the
    reference at once.
    """
    reasons = []
    for i, (name, run) in enumerate(implementations):
        try:
            return run()
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
            later = implementations[i + 1:]
            if later or kernels != "gpu":  # something else runs next
                _log_unavailable(op, name, str(e), f"trying {later[0][0]}" if later else "running the jnp reference")
    if kernels == "gpu":
        raise NotImplementedError(f"{op} with kernels='gpu': no GPU implementation takes these inputs: "
                                  + "; ".join(reasons))
    return reference()


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

"""What every kernel benchmark shares: burst timing of jitted calls, torch timing, the relative error and the
check line. Correctness first: a benchmark checks each implementation against an fp32 reference on fresh
random inputs and times only those that pass.

`bench(fn, *args)`: warm-up (compile + 2 runs), then `reps` samples, each a burst of `inner` back-to-back calls
closed by one `block_until_ready` (a sub-millisecond kernel timed call by call would include the host's
dispatch and wait); `inner` defaults to as many calls as fill about `target_s` (1..50). Returns the median ms
per call. Torch (FLA, transformers) is timed with `triton.testing.do_bench`'s median.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def bench(fn, *args, reps: int = 15, inner: int | None = None, target_s: float = 0.05) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    if inner is None:
        inner = max(1, min(50, int(target_s / max(one, 1e-6))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples) * 1e3


def torch_ms(run) -> float:
    """Median ms of a torch callable on the GPU (triton.testing.do_bench, after one untimed call)."""
    import triton.testing

    run()
    return triton.testing.do_bench(run, warmup=100, rep=500, return_mode="median")


def rel_err(a, b) -> float:
    """Relative L2 error of a against the reference b, in fp32."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check(name: str, err: float, tol: float) -> bool:
    """Prints a PASS/FAIL line; True when err is finite and within tol."""
    ok = bool(np.isfinite(err) and err <= tol)
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
    return ok


def header() -> str:
    """The device and jax version, for the first line of a benchmark's output."""
    return f"{jax.devices()[0].device_kind}, jax {jax.__version__}"

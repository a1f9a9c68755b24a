"""Timing of jitted JAX calls for the GPU benchmark scripts (scripts/bench_*.py, check_moe_kernel.py).

`bench(fn, *args)`: warm-up (compile + 2 runs), then `reps` samples, each a burst of `inner` back-to-back
calls closed by one `block_until_ready` (a sub-millisecond kernel timed call by call would include the host's
dispatch and wait). `inner` defaults to as many calls as fill about `target_s` (1..50). Returns the median
ms per call and the (min, max) over the samples.
"""

from __future__ import annotations

import statistics
import time

import jax


def bench(fn, *args, reps=15, inner=None, target_s=0.05):
    out = jax.block_until_ready(fn(*args))
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
    return statistics.median(samples) * 1e3, (min(samples) * 1e3, max(samples) * 1e3)

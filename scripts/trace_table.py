"""GPU kernel tables from a JAX profiler trace, for the GPU benchmark scripts (bench_decode_step.py,
bench_kernels.py, check_moe_kernel.py; scripts/ is on sys.path when a script runs).

`trace_calls(log_dir, fn, calls)`: one untraced call of fn (warm), then `calls` calls under
jax.profiler, each waited for (the host sync between calls leaves the longest gaps between kernels).
`kernel_table(log_dir, calls)`: from the latest trace under log_dir, per traced call the GPU kernels' count,
busy time (union of their intervals), idle time between them and span; then the `top` kernel groups (names
without numeric suffixes: `fusion_12` and `fusion_3` are one group) by time, per call and as a share of the
summed kernel time. Kernels of every GPU plane are counted, whoever launched them (XLA, Pallas, or a torch /
Triton kernel in the same process: the trace records the process's CUDA kernels). `table(kernels, calls)`
is the pure part, on (name, start_ns, end_ns) tuples. While tracing, XLA runs kernel by kernel instead of
through command buffers (CUDA graphs), so a traced call can be longer than a timed one.

jax is imported inside the functions only: a script may set XLA_FLAGS before its first jax import.
"""

from __future__ import annotations

import os
import re

NO_KERNELS = "  no GPU kernels in the trace (CPU run?)"


def kernel_group(name: str) -> str:
    """The kernel's group: its name without trailing numeric suffixes (`_12`, `.3`), at most 70 characters."""
    return re.sub(r"([_.]\d+)+$", "", name)[:70]


def split_calls(kernels: list[tuple[str, int, int]], calls: int) -> list[list[tuple[str, int, int]]]:
    """The kernels, sorted by start, cut into at most `calls` runs at the `calls` - 1 longest gaps between one
    kernel's end and the next one's start (the host syncs between calls)."""
    ks = sorted(sorted(kernels), key=lambda k: k[1])
    gaps = sorted(range(1, len(ks)), key=lambda i: ks[i][1] - ks[i - 1][2], reverse=True)
    bounds = [0] + sorted(gaps[:calls - 1]) + [len(ks)]
    return [ks[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def call_stats(ks: list[tuple[str, int, int]]) -> tuple[int, int, int]:
    """(kernel count, busy ns: the union of their intervals, span ns: first start to last end) of one call."""
    from pcp_jax.overlap import merge_intervals
    busy = sum(e - s for s, e in merge_intervals([(s, e) for _, s, e in ks]))
    return len(ks), busy, max(e for _, _, e in ks) - ks[0][1]


def group_times(kernels: list[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """Per kernel group (`kernel_group`): (summed kernel ns, kernel count)."""
    groups: dict[str, list[int]] = {}
    for name, s, e in kernels:
        g = groups.setdefault(kernel_group(name), [0, 0])
        g[0] += e - s
        g[1] += 1
    return {name: (t, c) for name, (t, c) in groups.items()}


def table(kernels: list[tuple[str, int, int]], calls: int, top: int = 15, unit: str = "call") -> str:
    """Markdown lines (two-space indent): per traced `unit` its kernel count, busy, idle between kernels and
    span in ms; then the `top` kernel groups by time, per `unit` and as a share of the summed kernel time.
    NO_KERNELS when `kernels` is empty."""
    if not kernels:
        return NO_KERNELS
    lines = [f"  | traced {unit} | kernels | busy (ms) | idle between kernels (ms) | span (ms) |",
             "  |---|---|---|---|---|"]
    for i, ks in enumerate(split_calls(kernels, calls)):
        n, busy, span = call_stats(ks)
        lines.append(f"  | {i} | {n} | {busy / 1e6:.3f} | {(span - busy) / 1e6:.3f} | {span / 1e6:.3f} |")
    groups = group_times(kernels)
    total = sum(t for t, _ in groups.values()) or 1
    lines += [f"  | kernel (grouped) | per {unit} | ms per {unit} | share of busy |", "  |---|---|---|---|"]
    for name, (t, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  | {name} | {c / calls:.1f} | {t / calls / 1e6:.3f} | {t / total:.1%} |")
    return "\n".join(lines)


def trace_kernels(log_dir: str) -> list[tuple[str, int, int]]:
    """(name, start_ns, end_ns) of every kernel on the GPU planes' stream lines of the latest trace under
    log_dir (empty on a CPU run); FileNotFoundError when log_dir holds no trace."""
    from pcp_jax.overlap import device_kernels, latest_xplane
    per_dev = device_kernels(latest_xplane(log_dir))
    return [k for ks in per_dev.values() for k in ks]


def kernel_table(log_dir: str, calls: int, top: int = 15, unit: str = "call") -> str:
    """`table` of the latest trace under log_dir: NO_KERNELS when it holds no GPU kernel (a CPU run)."""
    return table(trace_kernels(log_dir), calls, top, unit)


def trace_calls(log_dir: str, fn, calls: int = 3) -> str:
    """Runs fn() once untraced (warm), then `calls` times under jax.profiler, each call's result waited for with
    jax.block_until_ready (a torch caller synchronizes inside fn). Returns log_dir, where the trace is."""
    import jax
    jax.block_until_ready(fn())
    os.makedirs(log_dir, exist_ok=True)
    jax.profiler.start_trace(log_dir)
    try:
        for _ in range(calls):
            jax.block_until_ready(fn())
    finally:
        jax.profiler.stop_trace()
    return log_dir


def profile_calls(title: str, log_dir: str, fn, calls: int = 3, top: int = 15) -> str:
    """`trace_calls` then `kernel_table`, under a heading line naming `title`, the call count and log_dir."""
    trace_calls(log_dir, fn, calls)
    return f"\nprofile of {calls} calls of {title} (trace under {log_dir}):\n{kernel_table(log_dir, calls, top)}"

"""scripts/trace_table.py, the kernel tables of the GPU benchmarks' --profile: on CPU a traced jitted function
leaves a trace with no GPU kernels; the splitting into calls and the grouping by name are checked on
synthetic kernels."""

import glob
import importlib
import os
import pathlib

import pytest

SCRIPTS = pathlib.Path(__file__).parents[1] / "scripts"
MS = 10**6  # ns


@pytest.fixture
def tt(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # as when a script runs: scripts/ is on sys.path
    return importlib.import_module("trace_table")


def test_trace_calls_on_cpu_writes_a_trace_without_gpu_kernels(tt, tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((32, 32), jnp.float32)
    calls = []

    def fn():
        calls.append(1)
        return f(x)

    out = tt.trace_calls(str(tmp_path / "trace"), fn, 3)
    assert out == str(tmp_path / "trace") and len(calls) == 4  # one warm call, three traced
    assert glob.glob(os.path.join(out, "plugins", "profile", "*", "*.xplane.pb"))
    assert tt.trace_kernels(out) == []
    assert tt.kernel_table(out, 3) == tt.NO_KERNELS == "  no GPU kernels in the trace (CPU run?)"
    text = tt.profile_calls("sin matmul", str(tmp_path / "p"), fn, 2)
    assert text.endswith(tt.NO_KERNELS) and "profile of 2 calls of sin matmul" in text
    bds = importlib.import_module("bench_decode_step")  # its --profile report goes through trace_table
    assert bds.profile_report(out, 3, 1.0) == tt.NO_KERNELS


def test_kernel_group_drops_numeric_suffixes(tt):
    assert [tt.kernel_group(n) for n in ("fusion_12", "fusion_3", "gemm.1.2", "loop_add_fusion", "k_7_x")] == [
        "fusion", "fusion", "gemm", "loop_add_fusion", "k_7_x"]
    assert len(tt.kernel_group("a" * 100 + "_1")) == 70


# Two calls 10 ms apart. Call 0: fusion_12 [0, 1), fusion_3 [1.5, 2.5), gemm.1 [2, 3) (overlaps fusion_3)
# -> busy 2.5 ms, span 3 ms, idle 0.5 ms. Call 1: fusion_7 [13, 14), then gemm.2 [14.25, 15)
# -> busy 1.75 ms, span 2 ms, idle 0.25 ms. Listed out of order: the table sorts by start.
KERNELS = [("gemm.2", 14_250_000, 15 * MS), ("fusion_12", 0, 1 * MS), ("fusion_3", 1_500_000, 2_500_000),
           ("gemm.1", 2 * MS, 3 * MS), ("fusion_7", 13 * MS, 14 * MS)]


def test_split_calls_cuts_at_the_longest_gaps(tt):
    parts = tt.split_calls(KERNELS, 2)
    assert [[n for n, _, _ in p] for p in parts] == [["fusion_12", "fusion_3", "gemm.1"], ["fusion_7", "gemm.2"]]
    assert [tt.call_stats(p) for p in parts] == [(3, 2_500_000, 3 * MS), (2, 1_750_000, 2 * MS)]
    assert len(tt.split_calls(KERNELS, 1)) == 1
    assert [len(p) for p in tt.split_calls(KERNELS, 3)] == [1, 2, 2]  # next longest gap: 0.5 ms after fusion_12
    assert len(tt.split_calls(KERNELS, 9)) == 5  # never more parts than kernels


def test_group_times_and_table(tt):
    assert tt.group_times(KERNELS) == {"fusion": (3 * MS, 3), "gemm": (1_750_000, 2)}
    lines = tt.table(KERNELS, 2).splitlines()
    assert lines == [
        "  | traced call | kernels | busy (ms) | idle between kernels (ms) | span (ms) |", "  |---|---|---|---|---|",
        "  | 0 | 3 | 2.500 | 0.500 | 3.000 |",
        "  | 1 | 2 | 1.750 | 0.250 | 2.000 |",
        "  | kernel (grouped) | per call | ms per call | share of busy |", "  |---|---|---|---|",
        "  | fusion | 1.5 | 1.500 | 63.2% |",
        "  | gemm | 1.0 | 0.875 | 36.8% |"]
    assert tt.table(KERNELS, 2, top=1, unit="step").splitlines()[-1] == "  | fusion | 1.5 | 1.500 | 63.2% |"
    assert tt.table(KERNELS, 2, unit="step").splitlines()[0].startswith("  | traced step |")
    assert tt.table([], 3) == tt.NO_KERNELS

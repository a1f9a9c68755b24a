"""Our Mosaic GPU grouped matmul (kernels/moe/mosaic_gpu.py) on one GPU: correctness against the fp32 jnp
reference first (ragged groups, empty experts, unrouted padding rows), then a quick timing against tokamax's
ragged_dot at the expert shapes of the MoE presets. The full comparison is scripts/bench_moe.py.

    python scripts/check_moe_kernel.py [--tokens 8192,32768] [--presets qwen3.5-397b-a17b,...] [--profile DIR]

--profile DIR: after each case's timings, traces 3 calls of our default SwiGLU (gate/up) stage and 3 of our
default down stage (mg.default_config for the case's rows and experts) under
DIR/<preset>_<tokens>/{swiglu,down}, and prints per call the GPU kernels' count, busy and idle time, and the
top kernel groups (scripts/trace_table.py), after the case's table.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax.config import PRESETS
from pcp_jax.kernels.moe import mosaic_gpu as mg
from pcp_jax.kernels.moe import reference as ref
from pcp_jax.kernels.moe import tokamax_gpu
from burst_timing import bench  # scripts/ is on sys.path when a script runs
from trace_table import profile_calls

PEAK = 799.0


def timeit(fn, *args):
    """Median ms per call over 7 bursts of 10 back-to-back calls (scripts/burst_timing.py)."""
    return bench(fn, *args, reps=7, inner=10)[0]


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def routing(key, T, E, k):
    """Sorted expert sizes of a softmax/top-k routing of T random tokens."""
    logits = jax.random.normal(key, (T, E), jnp.float32)
    _, e = jax.lax.top_k(logits, k)
    return jnp.bincount(e.reshape(-1), length=E).astype(jnp.int32)


def _new_shape(cfg) -> bool:
    """Configs whose tile shape the first configs of the sweeps do not share (taller row tiles, longer
    contraction steps): checked here as well before they are timed."""
    return cfg.block_m > 128 or cfg.block_k > 64


def check() -> bool:
    ok = True
    rng = np.random.default_rng(0)
    for M, K, N, E, sizes in [(1000, 512, 512, 8, [300, 0, 123, 77, 200, 0, 1, 250]),
                              (4096, 1024, 1024, 64, None), (10, 256, 256, 4, [3, 0, 7, 0])]:
        gs = jnp.asarray(sizes, jnp.int32) if sizes else routing(jax.random.PRNGKey(M), M // 4, E, 4)
        lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
        wg = jnp.asarray(rng.standard_normal((E, K, N)) * K**-0.5, jnp.bfloat16)
        wu = jnp.asarray(rng.standard_normal((E, K, N)) * K**-0.5, jnp.bfloat16)
        lhs = lhs.at[int(jnp.sum(gs)):].set(jnp.nan)  # unrouted rows must not leak into the output
        want = ref.grouped_matmul(lhs.astype(jnp.float32), wg.astype(jnp.float32), gs)
        want_s = mg.swiglu_reference(lhs.astype(jnp.float32), wg, wu, gs)
        cases = [("matmul", cfg, lambda a, b, c, g, cfg=cfg: mg.grouped_matmul(a, b, g, config=cfg), want)
                 for cfg in mg.SWEEP[:3] + tuple(c for c in mg.SWEEP if _new_shape(c))]
        cases += [("swiglu", cfg, lambda a, b, c, g, cfg=cfg: mg.grouped_swiglu(a, b, c, g, config=cfg), want_s)
                  for cfg in mg.SWIGLU_SWEEP[:2] + tuple(c for c in mg.SWIGLU_SWEEP if _new_shape(c))]
        for op, cfg, run, expected in cases:
            try:
                e = rel(jnp.nan_to_num(jax.jit(run)(lhs, wg, wu, gs), nan=1e6), expected)
            except Exception as ex:  # noqa: BLE001
                print(f"check {op} {cfg} raised {str(ex)[:300]}")
                e = float("inf")
            ok &= e < 1e-2
            print(f"check {op} M={M} K={K} N={N} E={E} {cfg}: rel err {e:.2e} {'ok' if e < 1e-2 else 'FAIL'}")
    return ok


def profile_stages(out_dir, x, wg, wu, h, wd, gs):
    """The kernel tables of 3 traced calls of our default SwiGLU stage and 3 of our default down stage, as text;
    a stage that fails says so."""
    M, E = x.shape[0], wg.shape[0]
    stages = [("swiglu", f"ours swiglu {mg.default_config(M, E, True)}", jax.jit(mg.grouped_swiglu), (x, wg, wu, gs)),
              ("down", f"ours down {mg.default_config(M, E, False)}", jax.jit(mg.grouped_matmul), (h, wd, gs))]
    parts = []
    for stage, title, f, args in stages:
        try:
            parts.append(profile_calls(title, os.path.join(out_dir, stage), lambda f=f, args=args: f(*args)))
        except Exception as e:  # noqa: BLE001
            parts.append(f"\nprofile of {title} failed: {str(e)[:300]}")
    return "".join(parts)


def timings(presets, tokens, profile=None):
    """Prints the timing table of every preset x token count; with `profile` (a folder), then the kernel tables
    of `profile_stages` per case."""
    profiles = []
    print("\n| preset | tokens | op | impl | config | ms | TFLOP/s | % of 799 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in presets:
        cfg = PRESETS[name]
        H, E, k, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        kw = jax.random.split(jax.random.PRNGKey(1), 4)
        wg = jax.random.normal(kw[0], (E, H, I), jnp.bfloat16)
        wu = jax.random.normal(kw[1], (E, H, I), jnp.bfloat16)
        wd = jax.random.normal(kw[2], (E, I, H), jnp.bfloat16)
        for T in tokens:
            M = T * k
            gs = routing(jax.random.PRNGKey(T), T, E, k)
            x = jax.random.normal(kw[3], (M, H), jnp.bfloat16)
            h = jax.random.normal(kw[3], (M, I), jnp.bfloat16)
            f_gu, f_d = 4.0 * M * H * I, 2.0 * M * I * H

            def row(op, impl, c, ms, flops):
                tf = flops / ms / 1e9
                print(f"| {name} | {T} | {op} | {impl} | {c} | {ms:.3f} | {tf:.0f} | {100 * tf / PEAK:.0f} |", flush=True)

            tk_gu = jax.jit(lambda a, b, c, g: jax.nn.silu(tokamax_gpu.grouped_matmul(a, b, g))
                            * tokamax_gpu.grouped_matmul(a, c, g))
            row("gate/up", "tokamax", "heuristic", timeit(tk_gu, x, wg, wu, gs), f_gu)
            for c in mg.SWIGLU_SWEEP:
                try:
                    f = jax.jit(lambda a, b, d, g, c=c: mg.grouped_swiglu(a, b, d, g, config=c))
                    row("gate/up", "ours swiglu", c, timeit(f, x, wg, wu, gs), f_gu)
                except Exception as e:  # noqa: BLE001
                    print(f"  swiglu {c} failed: {str(e)[:200]}")
            tk_d = jax.jit(tokamax_gpu.grouped_matmul)
            row("down", "tokamax", "heuristic", timeit(tk_d, h, wd, gs), f_d)
            for c in mg.SWEEP:
                try:
                    f = jax.jit(lambda a, b, g, c=c: mg.grouped_matmul(a, b, g, config=c))
                    row("down", "ours", c, timeit(f, h, wd, gs), f_d)
                except Exception as e:  # noqa: BLE001
                    print(f"  matmul {c} failed: {str(e)[:200]}")
            if profile:
                text = profile_stages(os.path.join(profile, f"{name}_{T}"), x, wg, wu, h, wd, gs)
                profiles.append(f"\n{name}, {T} tokens:{text}")
    if profiles:
        print("".join(profiles), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--presets", default="qwen3.5-397b-a17b,qwen3.5-122b-a10b,qwen3.5-35b-a3b")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--cases", default="", help="preset:tokens,... instead of the --presets x --tokens product")
    ap.add_argument("--profile", metavar="DIR", help="trace our default stages per case; print kernel tables")
    a = ap.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__)
    ok = check()
    print("checks", "passed" if ok else "FAILED")
    if not ok or a.check_only:
        return 0 if ok else 1
    if a.cases:
        for case in a.cases.split(","):
            name, tokens = case.split(":")
            timings([name], [int(tokens)], a.profile)
    else:
        timings(a.presets.split(","), [int(t) for t in a.tokens.split(",")], a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

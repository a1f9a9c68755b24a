"""MoE expert stages on one GPU: our Mosaic GPU grouped matmul (kernels/moe/mosaic_gpu.py, its default tiles) and
tokamax's `ragged_dot` (the fallback, kernels/moe/tokamax_gpu.py), checked against the fp32 jnp reference, then
timed at the expert shapes of the MoE presets.

    python benchmarks/moe.py [--cases qwen3.5-397b-a17b:8192,...]

CHECKS (M, K, N, E, group sizes or None for a random top-4 routing): ragged groups, empty experts, and NaN in
the unrouted rows past the groups (they must not reach the output); bf16, tol 1e-2. The first case's experts
hold ~125 rows (the 192-row tiles), the second's ~64 (128-row tiles).
CASES (preset, tokens): T tokens routed by a random softmax/top-k over the preset's experts, M = T·k rows;
gate/up + SwiGLU (ours fused: one kernel; tokamax: two calls and an XLA SwiGLU) and down. TFLOP/s count the
routed rows only (4·M·D·I and 2·M·I·D); % of the bf16 peak in benchmarks/peaks.py. Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from peaks import BF16_TFLOPS
from pcp_jax.config import PRESETS
from pcp_jax.kernels.moe import mosaic_gpu, reference, tokamax_gpu
from timing import bench, check, header, rel_err

CHECKS = [(1000, 512, 512, 8, [300, 0, 123, 77, 200, 0, 1, 250]), (4096, 1024, 1024, 64, None),
          (10, 256, 256, 4, [3, 0, 7, 0])]
CASES = [("qwen3.5-397b-a17b", 8192), ("qwen3.5-397b-a17b", 32768), ("qwen3.5-122b-a10b", 8192),
         ("qwen3.5-122b-a10b", 32768), ("qwen3.5-35b-a3b", 8192), ("qwen3.5-35b-a3b", 32768)]


def routing(key, tokens: int, experts: int, k: int):
    """Group sizes [experts] of a top-k routing of random logits (rows sorted by expert)."""
    _, top = jax.lax.top_k(jax.random.normal(key, (tokens, experts), jnp.float32), k)
    return jnp.bincount(top.reshape(-1), length=experts).astype(jnp.int32)


def tokamax_swiglu(lhs, w_gate, w_up, sizes):
    return jax.nn.silu(tokamax_gpu.grouped_matmul(lhs, w_gate, sizes)) * tokamax_gpu.grouped_matmul(lhs, w_up, sizes)


IMPLEMENTATIONS = {  # stage -> (name, fn(lhs, weights..., sizes))
    "gate/up": [("ours", jax.jit(mosaic_gpu.grouped_swiglu)), ("tokamax", jax.jit(tokamax_swiglu))],
    "down": [("ours", jax.jit(mosaic_gpu.grouped_matmul)), ("tokamax", jax.jit(tokamax_gpu.grouped_matmul))],
}


def run_checks() -> bool:
    ok, rng = True, np.random.default_rng(0)
    for M, K, N, E, sizes in CHECKS:
        gs = jnp.asarray(sizes, jnp.int32) if sizes else routing(jax.random.PRNGKey(M), M // 4, E, 4)
        lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16).at[int(jnp.sum(gs)):].set(jnp.nan)
        wg, wu = (jnp.asarray(rng.standard_normal((E, K, N)) * K**-0.5, jnp.bfloat16) for _ in range(2))
        up = lambda x: x.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):
            want = {"gate/up": mosaic_gpu.swiglu_reference(up(lhs), up(wg), up(wu), gs),
                    "down": reference.grouped_matmul(up(lhs), up(wg), gs)}
        for stage, impls in IMPLEMENTATIONS.items():
            for name, fn in impls:
                out = fn(lhs, wg, wu, gs) if stage == "gate/up" else fn(lhs, wg, gs)
                err = rel_err(jnp.nan_to_num(out, nan=1e6), want[stage])  # a leaked NaN row fails
                ok &= check(f"{stage} {name} M={M} K={K} N={N} E={E}", err, 1e-2)
    return ok


def time_case(preset: str, tokens: int) -> list[tuple]:
    cfg = PRESETS[preset]
    D, E, k, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    M, keys = tokens * k, jax.random.split(jax.random.PRNGKey(1), 6)
    sizes = routing(keys[0], tokens, E, k)
    wg, wu = (jax.random.normal(key, (E, D, I), jnp.bfloat16) * jnp.bfloat16(D**-0.5) for key in keys[1:3])
    wd = jax.random.normal(keys[3], (E, I, D), jnp.bfloat16) * jnp.bfloat16(I**-0.5)
    x, h = jax.random.normal(keys[4], (M, D), jnp.bfloat16), jax.random.normal(keys[5], (M, I), jnp.bfloat16)
    args = {"gate/up": (x, wg, wu, sizes), "down": (h, wd, sizes)}
    configs = {"gate/up": mosaic_gpu.default_config(M, E, True), "down": mosaic_gpu.default_config(M, E, False, I)}
    flops = {"gate/up": 4.0 * M * D * I, "down": 2.0 * M * I * D}
    rows = []
    for stage, impls in IMPLEMENTATIONS.items():
        for name, fn in impls:
            config = configs[stage] if name == "ours" else "heuristic"
            rows.append((preset, tokens, stage, name, config, bench(fn, *args[stage], reps=7, inner=10), flops[stage]))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(f"{n}:{t}" for n, t in CASES), help="preset:tokens,...")
    args = p.parse_args()
    print(header(), flush=True)
    ok = run_checks()
    rows = [r for case in args.cases.split(",") for r in time_case(case.split(":")[0], int(case.split(":")[1]))]
    print(f"\n| preset | tokens | stage | implementation | config | ms | TFLOP/s | % of {BF16_TFLOPS:.0f} |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, tokens, stage, name, config, ms, flops in rows:
        tflops = flops / ms / 1e9
        print(f"| {preset} | {tokens} | {stage} | {name} | {config} | {ms:.3f} | {tflops:.0f} | "
              f"{100 * tflops / BF16_TFLOPS:.0f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

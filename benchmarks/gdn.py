"""Gated DeltaNet chunked forward on one GPU: our Pallas kernels (kernels/gdn/api.py, default tiling) checked
against the fp32 jnp reference, then timed against flash-linear-attention's `chunk_gated_delta_rule` (torch, same
GPU, the same inputs through DLPack).

    python benchmarks/gdn.py [--tokens 8192,32768,131072] [--heads 32,64]

CHECKS (B, T, Hk, Hv, dk, dv, dtype, initial state): fp32 inputs run the kernels' exact three-stage path (tol
1e-4), bf16 the fused pass (tol 1e-2: the bf16 intermediates cost ~3.5e-3, as FLA's do); dv = 256 is the
`sequence` strategy's [v | 0]. Timed: B = 1, 16 q/k heads, dk = dv = 128, bf16 q/k/v, fp32 g/beta, no initial
state, the final state returned by both (Qwen3.5: 32 value heads for the 9B, 64 for the 122B/397B); ours is
checked against FLA's output first (tol 2e-2: both bf16, rounded differently). Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (FLA) shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pcp_jax.kernels.gdn import api, reference  # noqa: E402
from timing import bench, check, header, rel_err, torch_ms  # noqa: E402

CHECKS = [  # (B, T, Hk, Hv, dk, dv, dtype, initial state)
    (2, 1000, 2, 4, 128, 128, jnp.float32, True),
    (1, 777, 4, 8, 128, 256, jnp.float32, True),
    (1, 4096, 16, 32, 128, 128, jnp.bfloat16, False),
    (1, 4096, 16, 64, 128, 128, jnp.bfloat16, True),
    (1, 2048, 2, 4, 128, 256, jnp.bfloat16, True),
]


def inputs(seed, B, T, Hk, Hv, dk, dv, dtype, with_state):
    """q, k unit rows, v N(0, 1), decays as the model makes them (mostly small), beta in (0, 1)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    unit = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
    q = unit(jax.random.normal(ks[0], (B, T, Hk, dk), jnp.float32))
    k = unit(jax.random.normal(ks[1], (B, T, Hk, dk), jnp.float32))
    v = jax.random.normal(ks[2], (B, T, Hv, dv), jnp.float32).astype(dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv)) - 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv)))
    s0 = jax.random.normal(ks[5], (B, Hv, dk, dv), jnp.float32) * 0.1 if with_state else None
    return q, k, v, g, beta, s0


ours = jax.jit(lambda *a: api.gated_delta_rule(*a, kernels="gpu"))


def run_checks() -> bool:
    ok = True
    for i, (B, T, Hk, Hv, dk, dv, dtype, with_state) in enumerate(CHECKS):
        args = inputs(100 + i, B, T, Hk, Hv, dk, dv, dtype, with_state)
        o, s = ours(*args)
        up = lambda x: None if x is None else x.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):
            o_ref, s_ref = jax.jit(reference.chunk_gated_delta_rule)(*map(up, args))
        tol = 1e-4 if dtype == jnp.float32 else 1e-2
        tag = f"B{B} T{T} Hk{Hk} Hv{Hv} dk{dk} dv{dv} {jnp.dtype(dtype).name}{' +S0' if with_state else ''}"
        ok &= check(f"{tag} o", rel_err(o, o_ref), tol)
        ok &= check(f"{tag} final state", rel_err(s, s_ref), tol)
    return ok


def fla(q, k, v, g, beta):
    """FLA's forward on the same arrays (torch views through DLPack), as a zero-argument callable."""
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    tq, tk, tv, tg, tb = (torch.utils.dlpack.from_dlpack(x) for x in (q, k, v, g, beta))
    return lambda: chunk_gated_delta_rule(tq, tk, tv, tg, tb, output_final_state=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8192,32768,131072")
    p.add_argument("--heads", default="32,64", help="value heads (16 q/k heads)")
    args = p.parse_args()
    print(header(), flush=True)
    ok = run_checks()
    rows = []
    for T in map(int, args.tokens.split(",")):
        for Hv in map(int, args.heads.split(",")):
            q, k, v, g, beta, _ = inputs(T + Hv, 1, T, 16, Hv, 128, 128, jnp.bfloat16, False)
            ms = bench(ours, q, k, v, g, beta, reps=9)
            try:
                run = fla(q, k, v, g, beta)
                o_fla = jnp.asarray(run()[0].float().cpu().numpy())
                ok &= check(f"ours vs FLA T{T} Hv{Hv} o", rel_err(ours(q, k, v, g, beta)[0], o_fla), 2e-2)
                fla_ms = torch_ms(run)
            except Exception as e:  # FLA missing or failing must not hide our numbers
                print(f"  FLA T{T} Hv{Hv}: {e!r}", flush=True)
                fla_ms = float("nan")
            rows.append((T, Hv, fla_ms, ms))
    print("\n| T | Hv | FLA ms | ours ms | FLA / ours |\n|---|---|---|---|---|")
    for T, Hv, fla_ms, ms in rows:
        print(f"| {T} | {Hv} | {fla_ms:.3f} | {ms:.3f} | {fla_ms / ms:.2f}x |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Attention kernels on one GPU: the ring step through tokamax's flash attention (kernels/attention/tokamax_gpu.py)
and the decode kernel that reads the stacked KV cache in place (kernels/attention/decode_pallas.py), each
checked against the fp32 jnp reference first; then one ring step timed against cuDNN.

    python benchmarks/attention.py [--tokens 4096,16384]

LAYOUTS: the position layouts a ring step or a chunked prefill can hand the wrapper (bf16, hd 256, 8 q / 2 kv
heads, 1024 tokens); rows that see no key must come back exactly 0 with lse -inf. Every mask form (`path`) is
also forced on the diagonal step. The decode kernel: bf16 and fp32 caches, a layer inside the stack, empty
slots past `used`, a row with a hole; the 9B's head shapes (hd 256, 16 q / 4 kv heads).
Timed (TIMED): hd 256, 32 q / 2 kv heads, B = 1, one step of Tq = Tk = T, through the forms the ring uses
("plain" for an unmasked step, "causal" for the diagonal one) and the slower ones; cuDNN:
`jax.nn.dot_product_attention(..., implementation="cudnn")`. TFLOP/s count 4·T²·Hq·D for an unmasked step
and half of it for a causal one. Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax.kernels.attention import api, decode_pallas, reference, tokamax_gpu
from timing import bench, check, header, rel_err

TIMED = [("unmasked", False, "plain"), ("diagonal", True, "causal"), ("diagonal", True, "range"),
         ("diagonal", True, "dense")]  # (step, causal, path)


def positions(start: int, n: int):
    return jnp.arange(start, start + n, dtype=jnp.int32)[None]


def layouts(T: int):
    """(name, q_pos, k_pos, causal) for T queries and T keys."""
    padded = jnp.concatenate([positions(2 * T, T - 200), -jnp.ones((1, 200), jnp.int32)], axis=1)
    shuffled = jnp.asarray(np.random.default_rng(1).permutation(T).astype(np.int32))[None]
    return [("diagonal", positions(T, T), positions(T, T), True),
            ("unmasked", positions(T, T), positions(0, T), False),
            ("earlier keys, causal", positions(T, T), positions(0, T), True),
            ("later keys (empty)", positions(0, T), positions(T, T), True),
            ("padded keys, causal", positions(2 * T + 300, T), padded, True),
            ("padded keys, non-causal", positions(0, T), padded, False),
            ("offset diagonal", positions(T // 2, T), positions(0, T), True),
            ("shuffled keys (dense)", positions(0, T), shuffled, True)]


def reference_fp32(q, k, v, q_pos, k_pos, causal):
    up = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        return reference.attention_block(up(q), up(k), up(v), q_pos, k_pos, causal=causal)


def check_ring_step() -> bool:
    T, Hq, Hkv, D = 1024, 8, 2, 256
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    q, k, v = (jax.random.normal(key, (1, T, h, D), jnp.float32).astype(jnp.bfloat16)
               for key, h in zip(ks, (Hq, Hkv, Hkv)))
    ok = True
    run = {c: jax.jit(lambda *a, c=c: api.attention_block(*a, causal=c, kernels="gpu")) for c in (False, True)}
    for name, q_pos, k_pos, causal in layouts(T):
        out, lse = run[causal](q, k, v, q_pos, k_pos)
        out_ref, lse_ref = reference_fp32(q, k, v, q_pos, k_pos, causal)
        empty = ~jnp.isfinite(lse_ref)  # [B, Hq, T]: rows that see no key
        rows_zero = float(jnp.max(jnp.where(empty, jnp.abs(out).max(-1).swapaxes(1, 2), 0.0))) == 0.0
        same_empty = bool(jnp.all(jnp.isfinite(lse) == ~empty)) and rows_zero
        err = float(jnp.abs(out).max()) if bool(jnp.all(empty)) else rel_err(out, out_ref)
        ok &= check(f"ring step, {name}: out", err, 1e-2)
        lse_err = float(jnp.max(jnp.where(empty, 0.0, jnp.abs(lse - lse_ref))))  # max abs error
        ok &= check(f"ring step, {name}: lse (max abs; empty rows exact: {same_empty})",
                    lse_err if same_empty else float("inf"), 1e-2)
    diagonal = positions(T, T)
    out_ref, _ = reference_fp32(q, k, v, diagonal, diagonal, True)
    for path in ("causal", "range", "dense"):
        f = jax.jit(lambda *a, p=path: tokamax_gpu.attention_block(*a, causal=True, path=p))
        ok &= check(f"ring step, diagonal forced path={path}: out", rel_err(f(q, k, v, diagonal, diagonal)[0], out_ref),
                    1e-2)
    return ok


def check_decode() -> bool:
    N, B, S, Hkv, D, Hq, used = 4, 2, 4096, 4, 256, 16, 3000
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    k = jax.random.normal(ks[0], (N, B, S, Hkv, D), jnp.float32)
    v = jax.random.normal(ks[1], (N, B, S, Hkv, D), jnp.float32)
    q = jax.random.normal(ks[2], (B, 1, Hq, D), jnp.float32)
    k_pos = jnp.where(jnp.arange(S)[None] < used, jnp.arange(S)[None], -1).repeat(B, 0).astype(jnp.int32)
    k_pos = k_pos.at[1, 100:300].set(-1)
    q_pos = jnp.array([[used - 1], [2000]], jnp.int32)
    with jax.default_matmul_precision("highest"):  # not TF32 on the GPU
        want, want_lse = decode_pallas.reference(q, k, v, 2, q_pos, k_pos)
    ok = True
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)):
        f = jax.jit(lambda *a: decode_pallas.stacked_decode_attention(*a, used=used))
        out, lse = f(q.astype(dtype), k.astype(dtype), v.astype(dtype), 2, q_pos, k_pos)
        ok &= check(f"decode in place, {jnp.dtype(dtype).name}: out", rel_err(out, want), tol)
        ok &= check(f"decode in place, {jnp.dtype(dtype).name}: lse", rel_err(lse, want_lse), tol)
    return ok


def time_ring_step(T: int) -> list[tuple]:
    Hq, Hkv, D = 32, 2, 256
    ks = jax.random.split(jax.random.PRNGKey(T), 3)
    q, k, v = (jax.random.normal(key, (1, T, h, D), jnp.bfloat16) for key, h in zip(ks, (Hq, Hkv, Hkv)))
    pos, full = positions(0, T), 4.0 * T * T * Hq * D
    cudnn = {c: bench(jax.jit(lambda q, k, v, c=c: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                                  implementation="cudnn")), q, k, v)
             for c in (False, True)}
    rows = [(T, "unmasked", "cuDNN", cudnn[False], full), (T, "diagonal", "cuDNN causal", cudnn[True], full / 2)]
    for step, causal, path in TIMED:
        if path == "dense" and T > 4096:
            continue  # a [T, T] mask read by every block: timed at 4k only
        q_pos = pos + T if step == "unmasked" else pos  # unmasked: every key before every query
        f = jax.jit(lambda *a, c=causal, p=path: tokamax_gpu.attention_block(*a, causal=c, path=p))
        rows.append((T, step, f"tokamax, path={path}", bench(f, q, k, v, q_pos, pos), full / (2 if causal else 1)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="4096,16384")
    args = p.parse_args()
    print(header(), flush=True)
    ok = check_ring_step() & check_decode()
    rows = [r for T in map(int, args.tokens.split(",")) for r in time_ring_step(T)]
    print("\n| T | step | implementation | ms | TFLOP/s | cuDNN / this |\n|---|---|---|---|---|---|")
    for T, step, impl, ms, flops in rows:
        cudnn = next(m for t, s, i, m, _ in rows if (t, s) == (T, step) and i.startswith("cuDNN"))
        print(f"| {T} | {step} | {impl} | {ms:.3f} | {flops / ms / 1e9:.0f} | {cudnn / ms:.2f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

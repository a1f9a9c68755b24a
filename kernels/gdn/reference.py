"""Gated delta rule: the token-by-token recurrence (the oracle) and the chunked form in plain jnp.

Shapes (per batch row b, time t):
  q, k:  [B, T, Hk, dk]   l2-normalised by the caller; q is scaled by `scale` (default dk**-0.5) here.
  v:     [B, T, Hv, dv]   Hv = G * Hk; value head h reads q/k head h // G (repeat_interleave grouping),
                          without materialising the repeat.
  g:     [B, T, Hv]       log decay (<= 0), fp32.
  beta:  [B, T, Hv]       write strength in [0, 1], fp32.
  state: [B, Hv, dk, dv]  fp32.
Recurrence per value head:  S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T (scale q_t).
A token with g = 0 and beta = 0 leaves the state unchanged: that is how padding is kept out of states.
Outputs: o [B, T, Hv, dv] in v's dtype, final state fp32. All arithmetic in fp32.

`capture` (optional) [B, K] int32: per row, K token counts t (multiples of 64 up to the padded length, or -1
for none) at which to keep the state, i.e. the state after the row's first t tokens. The chunked forms then
return a third output, captured [B, K, Hv, dk, dv] fp32 (zeros where t is -1): what a prefix cache needs to
resume a later prompt at a block boundary without splitting the prefill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CHUNK = 64


def _group(x, hk):
    """[B, T, Hv, ...] -> [B, T, Hk, G, ...]."""
    return x.reshape(x.shape[:2] + (hk, x.shape[2] // hk) + x.shape[3:])


def naive_gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None):
    """Token-by-token recurrence (the reference every faster form is tested against)."""
    B, T, Hk, dk = k.shape
    Hv, dv = v.shape[2:]
    scale = dk**-0.5 if scale is None else scale
    f32 = jnp.float32
    qg = q.astype(f32) * scale
    kg = k.astype(f32)
    vg = _group(v.astype(f32), Hk)  # [B, T, Hk, G, dv]
    gg = _group(g.astype(f32), Hk)  # [B, T, Hk, G]
    bg = _group(beta.astype(f32), Hk)
    S0 = jnp.zeros((B, Hv, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
    S0 = S0.reshape(B, Hk, Hv // Hk, dk, dv)

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t = xs  # [B,Hk,dk] [B,Hk,dk] [B,Hk,G,dv] [B,Hk,G] [B,Hk,G]
        S = S * jnp.exp(g_t)[..., None, None]
        kv_mem = jnp.einsum("bhgkv,bhk->bhgv", S, k_t)
        delta = (v_t - kv_mem) * b_t[..., None]
        S = S + jnp.einsum("bhk,bhgv->bhgkv", k_t, delta)
        o_t = jnp.einsum("bhgkv,bhk->bhgv", S, q_t)
        return S, o_t

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (qg, kg, vg, gg, bg))
    S, o = lax.scan(step, S0, xs)
    o = jnp.moveaxis(o, 0, 1).reshape(B, T, Hv, dv)
    return o.astype(v.dtype), S.reshape(B, Hv, dk, dv)


def capture_chunks(capture, num_chunks: int):
    """capture [B, K] token counts (-1: none) -> (chunk indices [B, K] int32 in ascending order per row, each in
    0..num_chunks (-1 becomes num_chunks: the final state), and the order that sorted them)."""
    idx = jnp.where(capture < 0, num_chunks, jnp.minimum(capture // CHUNK, num_chunks)).astype(jnp.int32)
    order = jnp.argsort(idx, axis=1)
    return jnp.take_along_axis(idx, order, axis=1), order


def unsort_captures(captured, order, capture):
    """captured [B, K, ...] in `capture_chunks` order -> in the order of `capture`, zeros where it is -1."""
    inverse = jnp.argsort(order, axis=1)
    out = jnp.take_along_axis(captured, inverse.reshape(inverse.shape + (1,) * (captured.ndim - 2)), axis=1)
    return jnp.where((capture >= 0).reshape(capture.shape + (1,) * (captured.ndim - 2)), out, 0.0)


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None, chunk_size=CHUNK, capture=None):
    """Chunked form (WY/UT transform inside each chunk, one state update per chunk). Exact in exact
    arithmetic; in fp32 it matches the naive recurrence to ~1e-6 relative. Any T (padded internally with
    g = beta = 0 tokens, which leave the state unchanged). With `capture` (module docstring) also returns the
    captured states: each step keeps its chunk-start state where a row asks for that chunk."""
    B, T, Hk, dk = k.shape
    Hv, dv = v.shape[2:]
    G = Hv // Hk
    L = chunk_size
    scale = dk**-0.5 if scale is None else scale
    f32 = jnp.float32
    pad = (-T) % L
    if pad:
        padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        q, k, v, g, beta = map(padt, (q, k, v, g, beta))
    N = (T + pad) // L
    # [B, N, L, Hk, ...] with value heads split as (Hk, G).
    qc = q.astype(f32).reshape(B, N, L, Hk, dk) * scale
    kc = k.astype(f32).reshape(B, N, L, Hk, dk)
    vc = v.astype(f32).reshape(B, N, L, Hk, G, dv)
    gc = jnp.cumsum(g.astype(f32).reshape(B, N, L, Hk, G), axis=2)  # cumulative log decay in the chunk
    bc = beta.astype(f32).reshape(B, N, L, Hk, G)

    causal = jnp.tril(jnp.ones((L, L), bool))
    strict = jnp.tril(jnp.ones((L, L), bool), -1)
    # decay[i, j] = exp(gc_i - gc_j) for j <= i, masked before exp so it never overflows.
    diff = gc[:, :, :, None] - gc[:, :, None, :]  # [B,N,L(i),L(j),Hk,G]
    m = causal[None, None, :, :, None, None]
    decay = jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)
    kk = jnp.einsum("bnihd,bnjhd->bnijh", kc, kc)[..., None]  # [B,N,L,L,Hk,1]
    A = jnp.where(strict[None, None, :, :, None, None], kk * decay * bc[:, :, :, None], 0.0)
    # T = (I + A)^-1, lower unitriangular: solve instead of inverting.
    A = jnp.moveaxis(A, (2, 3), (-2, -1))  # [B,N,Hk,G,L,L]
    eye = jnp.eye(L, dtype=f32)
    rhs_u = jnp.moveaxis(vc * bc[..., None], 2, -2)  # [B,N,Hk,G,L,dv]
    rhs_w = jnp.moveaxis(kc[:, :, :, :, None, :] * (bc * jnp.exp(gc))[..., None], 2, -2)  # [B,N,Hk,G,L,dk]
    solve = lambda r: jax.scipy.linalg.solve_triangular(A + eye, r, lower=True, unit_diagonal=True)
    u = solve(rhs_u)  # [B,N,Hk,G,L,dv]
    w = solve(rhs_w)  # [B,N,Hk,G,L,dk]
    qk = jnp.einsum("bnihd,bnjhd->bnijh", qc, kc)[..., None] * decay  # [B,N,L,L,Hk,G] incl. diagonal
    qk = jnp.moveaxis(qk, (2, 3), (-2, -1))  # [B,N,Hk,G,L,L]
    gcm = jnp.moveaxis(gc, 2, -1)  # [B,N,Hk,G,L]
    q_dec = jnp.moveaxis(qc, 2, -2)[:, :, :, None] * jnp.exp(gcm)[..., None]  # [B,N,Hk,G,L,dk]
    k_dec = jnp.moveaxis(kc, 2, -2)[:, :, :, None] * jnp.exp(gcm[..., -1:] - gcm)[..., None]
    chunk_decay = jnp.exp(gcm[..., -1])  # [B,N,Hk,G]

    S0 = jnp.zeros((B, Hv, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
    S0 = S0.reshape(B, Hk, G, dk, dv)

    K = 0 if capture is None else capture.shape[1]
    want = jnp.zeros((B, K), jnp.int32) if capture is None else jnp.where(capture < 0, -1, capture // L)

    def step(carry, xs):
        S, kept = carry
        n, u_n, w_n, qk_n, qd_n, kd_n, cd_n = xs
        kept = jnp.where((want == n)[:, :, None, None, None, None], S[:, None], kept)  # chunk-start state
        v_new = u_n - w_n @ S  # [B,Hk,G,L,dv]
        o_n = qd_n @ S + qk_n @ v_new
        S = S * cd_n[..., None, None] + jnp.swapaxes(kd_n, -1, -2) @ v_new
        return (S, kept), o_n

    xs = (jnp.arange(N),) + tuple(jnp.moveaxis(a, 1, 0) for a in (u, w, qk, q_dec, k_dec, chunk_decay))
    kept = jnp.zeros((B, K, Hk, G, dk, dv), f32)
    (S, kept), o = lax.scan(step, (S0, kept), xs)  # o: [N,B,Hk,G,L,dv]
    o = jnp.transpose(o, (1, 0, 4, 2, 3, 5)).reshape(B, N * L, Hv, dv)[:, :T]
    if capture is None:
        return o.astype(v.dtype), S.reshape(B, Hv, dk, dv)
    kept = jnp.where((want >= N)[:, :, None, None, None, None], S[:, None], kept)  # at or past the end: final
    return o.astype(v.dtype), S.reshape(B, Hv, dk, dv), kept.reshape(B, K, Hv, dk, dv)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One decode step. q, k [B, Hk, dk]; v [B, Hv, dv]; g, beta [B, Hv]; state [B, Hv, dk, dv] fp32.
    Returns (o [B, Hv, dv], new state)."""
    o, S = naive_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], state, scale)
    return o[:, 0], S

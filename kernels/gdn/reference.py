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


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None, chunk_size=CHUNK):
    """Chunked form (WY/UT transform inside each chunk, one state update per chunk). Exact in exact
    arithmetic; in fp32 it matches the naive recurrence to ~1e-6 relative. Any T (padded internally with
    g = beta = 0 tokens, which leave the state unchanged)."""
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

    def step(S, xs):
        u_n, w_n, qk_n, qd_n, kd_n, cd_n = xs
        v_new = u_n - w_n @ S  # [B,Hk,G,L,dv]
        o_n = qd_n @ S + qk_n @ v_new
        S = S * cd_n[..., None, None] + jnp.swapaxes(kd_n, -1, -2) @ v_new
        return S, o_n

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (u, w, qk, q_dec, k_dec, chunk_decay))
    S, o = lax.scan(step, S0, xs)  # o: [N,B,Hk,G,L,dv]
    o = jnp.transpose(o, (1, 0, 4, 2, 3, 5)).reshape(B, N * L, Hv, dv)[:, :T]
    return o.astype(v.dtype), S.reshape(B, Hv, dk, dv)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One decode step. q, k [B, Hk, dk]; v [B, Hv, dv]; g, beta [B, Hv]; state [B, Hv, dk, dv] fp32.
    Returns (o [B, Hv, dv], new state)."""
    o, S = naive_gated_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], state, scale)
    return o[:, 0], S

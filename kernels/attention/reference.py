"""Attention of a block of queries to a block of keys, with the log-sum-exp of each query row.

The building block of ring attention and of decode over a sharded KV cache: each call sees only a part
of the keys; partial results are combined exactly with `merge_partials`.

Shapes: q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Hq = G * Hkv (query head h reads KV head h // G;
K/V are never repeated in memory). Masking is by global token position: query i sees key j iff
`k_pos[b, j] >= 0` and, when `causal`, `k_pos[b, j] <= q_pos[b, i]` (q_pos [B, Tq], k_pos [B, Tk] int32;
a negative key position marks an empty cache slot or padding).
Returns out [B, Tq, Hq, D] fp32 (normalised within the block; 0 where a row sees no key) and
lse [B, Hq, Tq] fp32 (-inf where a row sees no key). Softmax in fp32.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG_INF = -jnp.inf


def attention_block(q, k, v, q_pos, k_pos, *, scale=None, causal=True):
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, Tq, Hkv, G, D)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    visible = (k_pos >= 0)[:, None, :]
    if causal:
        visible = visible & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, Tq, Tk]
    else:
        visible = jnp.broadcast_to(visible, (B, Tq, k.shape[1]))
    visible = visible[:, None, None]  # [B,1,1,Tq,Tk]
    s = jnp.where(visible, s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(visible, jnp.exp(s - m_safe), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    lse = jnp.where(denom > 0, m_safe + jnp.log(jnp.where(denom > 0, denom, 1.0)), NEG_INF)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, Tq, Hq, D), lse[..., 0].reshape(B, Hq, Tq)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Exact combination of two partial attentions over disjoint key sets.
    out [B, T, H, D] fp32, lse [B, H, T] fp32; -inf marks a part that saw no key (safe on both sides)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    lse_ref = jnp.where(jnp.isfinite(lse), lse, 0.0)
    wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - lse_ref), 0.0)
    wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - lse_ref), 0.0)
    to_rows = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # [B,H,T] -> [B,T,H,1]
    return out_a * to_rows(wa) + out_b * to_rows(wb), lse


def merge_stacked(outs, lses):
    """Combine P partials at once: outs [P, B, T, H, D], lses [P, B, H, T] -> (out, lse)."""
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lses), jnp.exp(lses - m_safe), 0.0)  # [P,B,H,T]
    total = jnp.sum(w, axis=0)
    lse = jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), NEG_INF)
    w = w / jnp.where(total > 0, total, 1.0)
    out = jnp.sum(outs * jnp.swapaxes(w, 2, 3)[..., None], axis=0)
    return out, lse

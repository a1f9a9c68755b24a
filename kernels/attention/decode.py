"""Decode attention split along the cache length ("split-K" / flash decoding), in plain jnp.

In decode one query row per sequence attends to all S slots of the KV cache. Written as one softmax over S
keys (reference.attention_block) that is a single long reduction per (row, head), and its value product is
a matmul whose contraction runs over all S keys with an output of only G·D values per KV head: little
parallel work for a GPU however long the cache. Here the S slots are cut into S / block blocks; each
block gives a partial (out, lse) over its keys, and the partials are merged exactly by log-sum-exp
(`merge_stacked`, the merge the `cp` path uses across ranks). Every reduction then runs over one block,
and the blocks are independent work.

Contract: that of reference.attention_block (same shapes, masking by position, out [B, Tq, Hq, D] fp32,
lse [B, Hq, Tq] fp32, -inf / 0 where a row sees no key) with S % block == 0. Exact in exact arithmetic;
in fp32 it matches the reference to ~1e-6 relative.

Two forms of the two products, the same math:
  "dot": einsums (XLA dots);
  "sum": broadcast multiply + sum in fp32 (XLA reduction fusions: they read K and V in their cache
         layout [B, S, Hkv, D], fused with the slice of the layer's cache, with no operand transposed or
         copied for a matmul library call).
"""

from __future__ import annotations

import jax.numpy as jnp

from .reference import NEG_INF, merge_stacked

FORMS = ("dot", "sum")


def split_block(slots: int, target_blocks: int = 64, min_block: int = 64) -> int:
    """Block length for `slots` cache slots: the largest power of two dividing `slots` and at most
    max(min_block, slots // target_blocks); about `target_blocks` blocks on long caches (several per KV
    head and SM group), never blocks so short that each carries more merge than work."""
    if slots < 1:
        raise ValueError(f"slots={slots!r} must be positive")
    cap = max(min_block, slots // target_blocks)
    block = 1
    while slots % (block * 2) == 0 and block * 2 <= cap:
        block *= 2
    return block


def split_attention(q, k, v, q_pos, k_pos, *, block: int, scale=None, causal: bool = True, form: str = "dot"):
    """q [B, Tq, Hq, D]; k, v [B, S, Hkv, D]; q_pos [B, Tq], k_pos [B, S] int32 (negative: empty slot).
    Returns (out [B, Tq, Hq, D] fp32, lse [B, Hq, Tq] fp32), as reference.attention_block."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}; expected one of {FORMS}")
    B, Tq, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if block < 1 or S % block:
        raise ValueError(f"block={block} must divide the {S} cache slots")
    n, G = S // block, Hq // Hkv
    f32 = jnp.float32
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, Tq, Hkv, G, D)
    kb = k.reshape(B, n, block, Hkv, D)
    vb = v.reshape(B, n, block, Hkv, D)
    pos = k_pos.reshape(B, n, 1, block)
    visible = pos >= 0
    if causal:
        visible = visible & (pos <= q_pos[:, None, :, None])  # [B, n, Tq, block]
    else:
        visible = jnp.broadcast_to(visible, (B, n, Tq, block))
    # Scores s [B, n, Tq, Hkv, G, block].
    if form == "dot":
        s = jnp.einsum("bqhgd,bnkhd->bnqhgk", qg, kb, preferred_element_type=f32)
    else:
        s = jnp.sum(qg.astype(f32)[:, None, :, None] * kb.astype(f32)[:, :, None, :, :, None, :], axis=-1)
        s = jnp.moveaxis(s, 3, -1)  # [B, n, Tq, block, Hkv, G] -> [B, n, Tq, Hkv, G, block]
    vis = visible[:, :, :, None, None, :]
    s = jnp.where(vis, s * scale, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(vis, jnp.exp(s - m_safe), 0.0)
    denom = jnp.sum(p, axis=-1)  # [B, n, Tq, Hkv, G]
    # Unnormalised partial outputs [B, n, Tq, Hkv, G, D].
    if form == "dot":
        o = jnp.einsum("bnqhgk,bnkhd->bnqhgd", p.astype(v.dtype), vb, preferred_element_type=f32)
    else:
        pv = jnp.moveaxis(p, -1, 3)  # [B, n, Tq, block, Hkv, G]
        o = jnp.sum(pv[..., None] * vb.astype(f32)[:, :, None, :, :, None, :], axis=3)
    seen = denom > 0
    o = o / jnp.where(seen, denom, 1.0)[..., None]
    lse = jnp.where(seen, m_safe[..., 0] + jnp.log(jnp.where(seen, denom, 1.0)), NEG_INF)
    # merge_stacked wants outs [P, B, Tq, Hq, D] and lses [P, B, Hq, Tq].
    outs = jnp.moveaxis(o.reshape(B, n, Tq, Hq, D), 1, 0)
    lses = jnp.moveaxis(lse.reshape(B, n, Tq, Hq), 1, 0).swapaxes(2, 3)
    return merge_stacked(outs, lses)

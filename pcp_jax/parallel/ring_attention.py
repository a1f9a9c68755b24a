"""Zigzag ring attention over the `cp` axis (per-shard code).

Rank r holds queries and keys of chunks r and 2C-1-r (each Lc tokens). K/V travel around the ring with
`ppermute` (Q never moves); at step i rank r holds the K/V of rank s = (r - i) mod C:
  step 0:   the local pair, causal:  q0·k0 (diagonal), q1·k0 (full), q1·k1 (diagonal);
  s < r:    chunk s precedes both local chunks and chunk 2C-1-s follows both, so every local query
            attends to the first half of the visiting K/V: one unmasked [2Lc x Lc] block;
  s > r:    both visiting chunks lie between the local ones, so the second half of the queries
            attends to all of it: one unmasked [Lc x 2Lc] block.
Every step is the same amount of work. Partial outputs are merged exactly by their log-sum-exp. The
next step's K/V is sent before the current step is computed so the transfer can overlap compute.
Padding sits at the end of the sequence, so causality alone keeps it away from real queries.
Every block's mask is known from this structure, so each call tells the kernel its form (`visible=`:
"diagonal" for the two causal blocks of step 0, "all" for the rest) and one kernel is compiled per call.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pcp_jax.kernels import attention_block, merge_partials

from .context import ShardContext


def _blank(q):
    B, T, H, D = q.shape
    return jnp.zeros((B, T, H, D), jnp.float32), jnp.full((B, H, T), -jnp.inf, jnp.float32)


def _local_step(q, k, v, pos, kernels):
    lc = q.shape[1] // 2
    q0, q1 = q[:, :lc], q[:, lc:]
    k0, k1, v0, v1 = k[:, :lc], k[:, lc:], v[:, :lc], v[:, lc:]
    p0, p1 = pos[:, :lc], pos[:, lc:]
    o0, l0 = attention_block(q0, k0, v0, p0, p0, causal=True, kernels=kernels, visible="diagonal")
    o1, l1 = merge_partials(*attention_block(q1, k0, v0, p1, p0, causal=False, kernels=kernels, visible="all"),
                            *attention_block(q1, k1, v1, p1, p1, causal=True, kernels=kernels, visible="diagonal"))
    return jnp.concatenate([o0, o1], axis=1), jnp.concatenate([l0, l1], axis=2)


def _remote_step(q, k, v, q_pos, k_pos, source_precedes, kernels):
    lc = q.shape[1] // 2

    def all_queries_first_half():
        return attention_block(q, k[:, :lc], v[:, :lc], q_pos, k_pos[:, :lc], causal=False, kernels=kernels,
                               visible="all")

    def second_half_queries_all():
        o, l = attention_block(q[:, lc:], k, v, q_pos[:, lc:], k_pos, causal=False, kernels=kernels, visible="all")
        o_blank, l_blank = _blank(q[:, :lc])
        return jnp.concatenate([o_blank, o], axis=1), jnp.concatenate([l_blank, l], axis=2)

    return lax.cond(source_precedes, all_queries_first_half, second_half_queries_all)


def ring_attention(q, k, v, ctx: ShardContext):
    """q [B, 2Lc, Hq, D], k/v [B, 2Lc, Hkv, D] local zigzag tokens; ctx.positions [B, 2Lc].
    Returns (out [B, 2Lc, Hq, D] fp32, lse [B, Hq, 2Lc] fp32) over the whole causal prefix."""
    pos = ctx.positions
    visiting = (k, v, pos)
    incoming = ctx.shift(visiting, 1) if ctx.cp > 1 else None
    out, lse = _local_step(q, k, v, pos, ctx.kernels)
    for i in range(1, ctx.cp):
        visiting = incoming
        if i + 1 < ctx.cp:
            incoming = ctx.shift(visiting, 1)  # send before computing: the transfer overlaps this step
        kv_k, kv_v, kv_pos = visiting
        part = _remote_step(q, kv_k, kv_v, pos, kv_pos, ctx.rank >= i, ctx.kernels)
        out, lse = merge_partials(out, lse, *part)
    return out, lse


def _attend_filled_blocks(q, q_pos, k, v, layer, kpos, ctx: ShardContext, n_blocks):
    """Queries against the first `n_blocks` (traced) blocks of this rank's slots of attention layer
    `layer` in the stacked cache k/v [NA, B, S, Hkv, D], block by block, so memory is bounded by the
    block, not by the cache length (and no copy of the layer's slots is made). Block = the local query
    length."""
    block = q.shape[1]
    B, _, H, D = k.shape[1:]

    def body(i, acc):
        take = lambda a: lax.dynamic_slice(a, (layer, 0, i * block, 0, 0), (1, B, block, H, D))[0]
        k_pos = lax.dynamic_slice_in_dim(kpos, i * block, block, axis=1)
        part = attention_block(q, take(k), take(v), q_pos, k_pos, causal=True, kernels=ctx.kernels)
        return merge_partials(*acc, *part)

    return lax.fori_loop(0, n_blocks, body, _blank(q))


def ring_over_cache(q, k_cache, v_cache, layer, kpos, ctx: ShardContext, n_blocks):
    """Chunked prefill: this piece's local queries attend to the KV cached by earlier pieces, which is
    spread over all ranks. The cache stays put; the queries travel around the ring with their running
    (out, lse): at step i rank r serves the queries of rank r - i against its own shard, then passes them
    on, and after C steps every accumulator is back home. Per step a rank sends 2Lc queries (bf16) and
    their fp32 accumulator, independent of how long the cached prefix is, and holds no other rank's cache
    (so memory follows the piece, not the prompt). The next queries are sent before the current ones are
    served; the accumulator can only leave once served. Every rank has filled the same `n_blocks` blocks.
    k_cache/v_cache [NA, B, S, Hkv, D] stacked over attention layers (this one is `layer`), kpos [B, S]
    (-1 empty). Returns (out fp32, lse) for the local queries."""
    visiting = (q, ctx.positions)
    acc = _blank(q)
    for i in range(ctx.cp):
        incoming = ctx.shift(visiting, 1) if i + 1 < ctx.cp else None
        acc = merge_partials(*acc, *_attend_filled_blocks(*visiting, k_cache, v_cache, layer, kpos, ctx, n_blocks))
        acc = ctx.shift(acc, 1)  # to the next rank; after the last step, back to the queries' own rank
        visiting = incoming
    return acc

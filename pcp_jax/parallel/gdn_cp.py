"""Gated DeltaNet across the `cp` axis (per-shard code): causal conv1d with halos, and the two ways to
run the recurrence over a prompt split into zigzag chunks.

`sequence` (any batch; the single long prompt): the recurrence is affine in its initial state,
S_end = P S_start + R, and its columns evolve independently. So one run of the chunked kernel with
values [v | 0] and initial state [0 | I] over each local chunk yields, at once, the chunk's output from a
zero state o0, the map of its queries q~_t = P_t^T q_t, and its (R, P). The 2C maps are all-gathered
(bytes independent of sequence length), each rank composes the prefix state S_in of its chunks, and the
true output is o = o0 + q~ S_in. No second pass.

`batch` (B % C == 0): `all_to_all` from sequence shards to whole sequences (B/C rows per rank), run
conv + chunked GDN on whole sequences, and `all_to_all` the outputs back.

Bytes each moves per layer and rank: see docs/communication.md and `communication_bytes`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax.kernels import gated_delta_rule

from .context import ShardContext
from .zigzag import chunk_order


def causal_conv(x, w, halo):
    """Depthwise causal conv1d + SiLU. x [B, T, Cd]; w [K, Cd] (w[K-1] multiplies the current token);
    halo [B, K-1, Cd] the K-1 tokens before x. Accumulated in fp32 (each tap is cast where it is read, so
    no fp32 copy of the sequence is made), returned in x's dtype."""
    K = w.shape[0]
    T = x.shape[1]
    xp = jnp.concatenate([halo.astype(x.dtype), x], axis=1)
    wf = w.astype(jnp.float32)
    out = sum(xp[:, j:j + T].astype(jnp.float32) * wf[j] for j in range(K))
    return jax.nn.silu(out).astype(x.dtype)


def conv_halos(x, ctx: ShardContext, initial_conv):
    """Preceding K-1 tokens of each local zigzag chunk. x [B, 2Lc, Cd] (pre-conv); initial_conv
    [B, K-1, Cd] is what precedes global token 0 (zeros, or a carried conv state).
    Returns [B, 2, K-1, Cd]. Chunk r follows chunk r-1 (first chunk of rank r-1); chunk 2C-1-r follows
    chunk 2C-2-r (second chunk of rank r+1, or this rank's own first chunk when r = C-1)."""
    h = initial_conv.shape[1]
    lc = x.shape[1] // 2
    first_tail, second_tail = x[:, lc - h:lc], x[:, 2 * lc - h:]
    if ctx.cp == 1:
        return jnp.stack([initial_conv.astype(x.dtype), first_tail], axis=1)
    from_prev = ctx.shift(first_tail, 1)      # rank r receives rank r-1's first-chunk tail
    from_next = ctx.shift(second_tail, -1)    # rank r receives rank r+1's second-chunk tail
    halo0 = jnp.where(ctx.rank == 0, initial_conv.astype(x.dtype), from_prev)
    halo1 = jnp.where(ctx.rank == ctx.cp - 1, first_tail, from_next)
    return jnp.stack([halo0, halo1], axis=1)


def _l2norm(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def split_heads(conv_out, cfg):
    """[..., conv_dim] -> q, k [..., Hk, dk] (l2-normalised, fp32), v [..., Hv, dv]."""
    kd = cfg.linear_key_dim
    lead = conv_out.shape[:-1]
    q = conv_out[..., :kd].reshape(lead + (cfg.linear_num_key_heads, cfg.linear_key_head_dim))
    k = conv_out[..., kd:2 * kd].reshape(lead + (cfg.linear_num_key_heads, cfg.linear_key_head_dim))
    v = conv_out[..., 2 * kd:].reshape(lead + (cfg.linear_num_value_heads, cfg.linear_value_head_dim))
    return _l2norm(q), _l2norm(k), v


def compose_prefix(maps_R, maps_P, initial_state):
    """Fold chunk maps in order: S_{c+1} = P_c S_c + R_c. maps_R [N, B, H, dk, dv], maps_P [N, B, H, dk, dk].
    Returns the start state of every chunk [N, B, H, dk, dv] and the final state [B, H, dk, dv]."""
    def step(S, pr):
        P, R = pr
        return jnp.einsum("bhij,bhjv->bhiv", P, S) + R, S
    final, starts = jax.lax.scan(step, initial_state, (maps_P, maps_R))
    return starts, final


def piece_start(ctx: ShardContext):
    """Position of the first token of this prefill piece (rank 0's first local token), traced scalar."""
    return ctx.pmin(jnp.min(ctx.positions))


def _captured_counts(ctx: ShardContext, start, length: int, rows: int):
    """[rows, K] token counts into a run of `length` tokens starting at position `start` after which
    ctx.capture's positions fall (0 < count <= length), else -1."""
    t = ctx.capture[None, :] - start
    return jnp.broadcast_to(jnp.where((t > 0) & (t <= length) & (ctx.capture[None, :] >= 0), t, -1),
                            (rows, ctx.capture.shape[0])).astype(jnp.int32)


def _initial_at_start(captured, ctx: ShardContext, start, initial_state):
    """captured [K, B, ...] with the capture positions equal to the piece's start taken from the initial state
    (a run captures only positions strictly inside it)."""
    at_start = (ctx.capture == start)[:, None, None, None, None]
    return jnp.where(at_start, initial_state.astype(jnp.float32)[None], captured)


def gdn_sequence(qkv, g, beta, conv_w, ctx: ShardContext, cfg, initial_conv, initial_state):
    """State-passing strategy. qkv [B, 2Lc, conv_dim] pre-conv; g, beta [B, 2Lc, Hv] fp32 (0 on padding).
    Returns (o [B, 2Lc, Hv, dv], final recurrent state [B, Hv, dk, dv] fp32, identical on every rank, and with
    `ctx.capture` [K] positions the states there [K, B, Hv, dk, dv] fp32 (else None), identical too)."""
    B, T, _ = qkv.shape
    lc = T // 2
    halos = conv_halos(qkv, ctx, initial_conv)  # [B, 2, K-1, Cd]
    chunks = qkv.reshape(B, 2, lc, -1)
    conv = jax.vmap(causal_conv, in_axes=(1, None, 1), out_axes=1)(chunks, conv_w, halos)
    q, k, v = split_heads(conv.reshape(B * 2, lc, -1), cfg)  # chunk-major rows: [b0c0, b0c1, b1c0, ...]
    g2, beta2 = g.reshape(B * 2, lc, -1), beta.reshape(B * 2, lc, -1)
    capture = ctx.capture is not None
    start = piece_start(ctx) if capture else None
    if ctx.cp == 1:  # both local chunks are contiguous: run straight through from the initial state
        o, final, *kept = gated_delta_rule(
            q.reshape(B, T, *q.shape[2:]), k.reshape(B, T, *k.shape[2:]), v.reshape(B, T, *v.shape[2:]), g, beta,
            initial_state, _captured_counts(ctx, start, T, B) if capture else None, kernels=ctx.kernels)
        if not capture:
            return o, final, None
        return o, final, _initial_at_start(jnp.moveaxis(kept[0], 1, 0), ctx, start, initial_state)
    H, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    # [v | 0] keeps v's dtype: fp32 values would send a bf16 model down the kernels' exact-fp32 path
    # (H100, 64k tokens per rank, 32 heads: 1468 ms per layer instead of 8.3 ms).
    v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (dk,), v.dtype)], axis=-1)
    init_aug = jnp.concatenate([jnp.zeros((B * 2, H, dk, dv), jnp.float32),
                                jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (B * 2, H, dk, dk))], axis=-1)
    own = jnp.stack([ctx.rank, 2 * ctx.cp - 1 - ctx.rank])  # global chunk of each local one
    if capture:  # each local chunk captures the positions strictly inside it, relative to its start
        chunk_start = start + own * lc  # [2]
        counts = jax.vmap(lambda s0: _captured_counts(ctx, s0, lc, B))(chunk_start)  # [2, B, K]
        counts = jnp.moveaxis(counts, 0, 1).reshape(B * 2, -1)
    o_aug, maps, *kept = gated_delta_rule(q, k, v_aug, g2, beta2, init_aug, counts if capture else None,
                                          kernels=ctx.kernels)
    o0, q_map = o_aug[..., :dv], o_aug[..., dv:]          # [2B, lc, H, dv], [2B, lc, H, dk]
    R, P = maps[..., :dv], maps[..., dv:]                  # [2B, H, dk, dv], [2B, H, dk, dk]
    # Gather every rank's two maps, put the 2C chunks in global order, fold.
    gather = lambda m: ctx.all_gather(m.reshape((B, 2) + m.shape[1:]), axis=0)  # [C, B, 2, ...]
    R_all, P_all = gather(R), gather(P)
    slot_of_chunk = np.empty(2 * ctx.cp, np.int64)  # position of global chunk c in (rank, slot) order
    slot_of_chunk[chunk_order(ctx.cp)] = np.arange(2 * ctx.cp)
    to_global = lambda m: jnp.moveaxis(m, 2, 1).reshape((2 * ctx.cp,) + m.shape[1:2] + m.shape[3:])[slot_of_chunk]
    starts, final = compose_prefix(to_global(R_all), to_global(P_all), initial_state.astype(jnp.float32))
    s_in = jnp.moveaxis(starts[own], 0, 1).reshape(B * 2, H, dk, dv)  # start state of each local chunk
    o = o0 + jnp.einsum("nthk,nhkv->nthv", q_map, s_in)
    captured = None
    if capture:  # S(p) = P_p S_in + R_p on the rank whose chunk holds p (zeros elsewhere), summed over ranks
        R_p, P_p = kept[0][..., :dv], kept[0][..., dv:]  # [2B, K, H, dk, dv], [2B, K, H, dk, dk]
        S_p = jnp.einsum("nkhij,nhjv->nkhiv", P_p, s_in) + R_p
        S_p = jnp.where((counts > 0)[:, :, None, None, None], S_p, 0.0).reshape(B, 2, *S_p.shape[1:]).sum(1)
        captured = _initial_at_start(ctx.psum(jnp.moveaxis(S_p, 1, 0)), ctx, start, initial_state)
    return o.reshape(B, T, H, dv).astype(v.dtype), final, captured


def gdn_batch(qkv, g, beta, conv_w, ctx: ShardContext, cfg, initial_conv, initial_state):
    """Resharding strategy (B % C == 0). Same contract as `gdn_sequence` (captures included)."""
    B, T, Cd = qkv.shape
    C = ctx.cp
    rows = B // C
    order = np.argsort(chunk_order(C))  # order[c] = zigzag slot holding global chunk c
    lc = T // 2

    def to_sequences(x):  # [B, 2Lc, ...] seq-sharded -> [B/C, 2C*Lc, ...] whole sequences, natural order
        x = jax.lax.all_to_all(x, ctx.axis, split_axis=0, concat_axis=1, tiled=True)
        x = x.reshape((rows, 2 * C, lc) + x.shape[2:])[:, order]
        return x.reshape((rows, 2 * C * lc) + x.shape[3:])

    def to_shards(x):  # inverse of to_sequences
        x = x.reshape((rows, 2 * C, lc) + x.shape[2:])[:, chunk_order(C)]
        x = x.reshape((rows, 2 * C * lc) + x.shape[3:])
        return jax.lax.all_to_all(x, ctx.axis, split_axis=1, concat_axis=0, tiled=True)

    mine = lambda x: jax.lax.dynamic_slice_in_dim(x, ctx.rank * rows, rows, axis=0)
    capture = ctx.capture is not None
    start = piece_start(ctx) if capture else None
    qkv_s, g_s, beta_s = to_sequences(qkv), to_sequences(g), to_sequences(beta)
    conv = causal_conv(qkv_s, conv_w, mine(initial_conv).astype(qkv.dtype))
    q, k, v = split_heads(conv, cfg)
    o, final, *kept = gated_delta_rule(q, k, v, g_s, beta_s, mine(initial_state),
                                       _captured_counts(ctx, start, 2 * C * lc, rows) if capture else None,
                                       kernels=ctx.kernels)
    gather = lambda x: ctx.all_gather(x, axis=0, tiled=True)
    captured = None
    if capture:
        captured = _initial_at_start(jnp.moveaxis(gather(kept[0]), 1, 0), ctx, start, initial_state)
    return to_shards(o), gather(final), captured


def resolve_strategy(strategy: str, batch: int, cp: int) -> str:
    """`auto` -> `batch` when B % C == 0 (whole-sequence GDN: no doubled state columns and no map
    composition), else `sequence`. See docs/communication.md for the bytes each moves."""
    if strategy not in ("auto", "batch", "sequence"):
        raise ValueError(f"gdn_strategy={strategy!r}; expected 'auto', 'batch' or 'sequence'")
    if cp == 1:
        return "sequence"
    if strategy == "batch" and batch % cp:
        raise ValueError(f"gdn_strategy='batch' needs the batch ({batch}) to be a multiple of cp ({cp})")
    if strategy == "auto":
        return "batch" if batch % cp == 0 else "sequence"
    return strategy


def communication_bytes(cfg, batch: int, tokens: int, cp: int, act_bytes: int = 2) -> dict[str, float]:
    """Bytes one rank sends per layer for a prompt of `tokens` (padded) tokens, batch `batch`.
    ring: K/V of its 2Lc tokens, C-1 times. batch: all_to_all of (qkv, g, beta) in and o out, each
    (C-1)/C of the local rows. sequence: all_gather of its 2 (R, P) maps to C-1 ranks (fp32) plus two
    conv halos."""
    t_local = tokens // cp
    hd, hkv = cfg.head_dim, cfg.num_kv_heads
    ring = (cp - 1) * batch * t_local * 2 * hkv * hd * act_bytes
    frac = (cp - 1) / cp
    H, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    a2a = frac * batch * t_local * ((cfg.conv_dim) * act_bytes + 2 * H * 4 + H * dv * act_bytes)
    seq = (cp - 1) * batch * 2 * H * dk * (dv + dk) * 4 + 2 * batch * (cfg.conv_kernel - 1) * cfg.conv_dim * act_bytes
    return {"ring_attention": ring, "gdn_batch": a2a, "gdn_sequence": seq}

"""MoE dispatch and combine, per shard: tokens sorted by expert for a grouped matmul whose work is that of the
routed tokens (never tokens x experts), and each token's expert outputs summed back in a fixed order. Under
`tp` each shard runs its own experts' rows (expert parallel); rows of other shards sort last."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_expert(top_e, first, count: int):
    """Dispatch order of the routed choices for the experts [first, first + count) held here.

    top_e [T, k] int expert ids (global); first: int or traced scalar; count: static. The choices (t, j) are
    flattened token-major (choice n = t·k + j) and sorted stably by expert, so each expert's rows are
    consecutive and in token order; choices of experts held elsewhere (other `tp` shards) sort last.
    Returns
      order [T·k] int32        the choice at each sorted position (its token is order // k),
      slot [T, k] int32        the sorted position of each choice (the inverse of order),
      group_sizes [count] int32 rows of each local expert; sorted positions >= their sum are not routed here.
    One key/value sort: the group sizes are read off the sorted keys (no bincount scatter) and the inverse is
    a scatter of distinct indices.
    """
    T, k = top_e.shape
    n = T * k
    local = top_e.reshape(n).astype(jnp.int32) - first
    local = jnp.where((local >= 0) & (local < count), local, count)
    keys, order = jax.lax.sort((local, jax.lax.iota(jnp.int32, n)), num_keys=1, is_stable=True)
    # Binary search of the count + 1 expert boundaries, unrolled: one small fused kernel, no loop.
    bounds = jnp.searchsorted(keys, jnp.arange(count + 1, dtype=jnp.int32), side="left",
                              method="scan_unrolled").astype(jnp.int32)
    slot = jnp.zeros((n,), jnp.int32).at[order].set(jax.lax.iota(jnp.int32, n), unique_indices=True)
    return order, slot.reshape(T, k), bounds[1:] - bounds[:-1]


def combine_experts(y, slot, weights, routed):
    """Weighted sum of each token's expert outputs, as a gather (no scatter-add).

    y [T·k, D] expert outputs in sorted order (sort_by_expert); slot [T, k] int, the row of y of each choice;
    weights [T, k] routing weights (any float dtype); routed: scalar int, rows of y computed here (rows at or
    past it belong to other shards and may hold anything: they contribute 0).
    Returns [T, D] in y's dtype: out[t] = Σ_j weights[t, j] · y[slot[t, j]], products and sum in fp32, one
    rounding. Each token reads its own k rows, so there are no atomics and the order of the sum is fixed.
    """
    rows = jnp.take(y, slot, axis=0).astype(jnp.float32)  # [T, k, D]
    terms = jnp.where((slot < routed)[..., None], rows * weights.astype(jnp.float32)[..., None], 0.0)
    return jnp.sum(terms, axis=1).astype(y.dtype)

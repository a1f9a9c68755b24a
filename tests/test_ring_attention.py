"""Zigzag layout, LSE merge and ring attention against dense causal attention (GQA, head_dim 256)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pcp_jax.kernels import attention_block, merge_partials, merge_stacked
from pcp_jax.parallel.context import ShardContext
from pcp_jax.parallel.ring_attention import ring_attention
from pcp_jax.parallel.zigzag import (chunk_order, from_zigzag, local_positions, padded_length, to_zigzag,
                                     token_permutation)
from hf_models import rel_err
from shard import run


def dense_causal(q, k, v):
    """Plain softmax attention in float64 numpy, GQA by repeating K/V."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    T = q.shape[1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_zigzag_round_trip_and_positions(cp):
    n_pad = padded_length(301, cp)
    assert n_pad % (2 * cp * 64) == 0 and n_pad >= 301
    x = np.random.default_rng(0).normal(size=(2, n_pad, 3)).astype(np.float32)
    z = to_zigzag(jnp.asarray(x), cp)
    np.testing.assert_array_equal(np.asarray(from_zigzag(z, cp)), x)
    lc = n_pad // (2 * cp)
    perm = token_permutation(n_pad, cp)
    for r in range(cp):
        shard = perm[r * 2 * lc:(r + 1) * 2 * lc]
        np.testing.assert_array_equal(shard, np.asarray(local_positions(r, cp, lc)))
        assert shard[0] == r * lc and shard[lc] == (2 * cp - 1 - r) * lc
    assert sorted(chunk_order(cp)) == list(range(2 * cp))


def test_merge_partials_is_exact_and_safe_with_fully_masked_parts():
    rng = np.random.default_rng(1)
    B, T, H, D = 2, 5, 4, 8
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, 12, 2, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, 12, 2, D)), jnp.float32)
    qpos = jnp.broadcast_to(jnp.arange(T) + 20, (B, T))
    kpos = jnp.broadcast_to(jnp.arange(12), (B, 12))
    full = attention_block(q, k, v, qpos, kpos)
    a = attention_block(q, k[:, :7], v[:, :7], qpos, kpos[:, :7])
    b = attention_block(q, k[:, 7:], v[:, 7:], qpos, kpos[:, 7:])
    masked = attention_block(q, k, v, qpos, jnp.full_like(kpos, -1))  # sees no key at all
    assert np.all(np.isneginf(np.asarray(masked[1]))) and np.all(np.asarray(masked[0]) == 0)
    out, lse = merge_partials(*merge_partials(*a, *masked), *b)
    np.testing.assert_allclose(out, full[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, full[1], rtol=1e-5, atol=1e-6)
    both_masked = merge_partials(*masked, *masked)
    assert np.all(np.isfinite(np.asarray(both_masked[0]))) and np.all(np.isneginf(np.asarray(both_masked[1])))
    stacked = merge_stacked(jnp.stack([a[0], masked[0], b[0]]), jnp.stack([a[1], masked[1], b[1]]))
    np.testing.assert_allclose(stacked[0], full[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_ring_attention_equals_dense_causal(cp):
    rng = np.random.default_rng(cp)
    B, lc, Hq, Hkv, D = 2, 8, 8, 2, 256
    T = 2 * cp * lc
    q, k, v = (rng.normal(size=(B, T, h, D)).astype(np.float32) for h in (Hq, Hkv, Hkv))
    ref = dense_causal(q, k, v)

    def per_shard(q, k, v):
        rank = jax.lax.axis_index("cp")
        pos = jnp.broadcast_to(local_positions(rank, cp, lc), (B, 2 * lc))
        ctx = ShardContext("cp", cp, "sequence", "jnp", rank, pos, jnp.full((B,), T, jnp.int32))
        return ring_attention(q, k, v, ctx)[0]

    zig = lambda a: np.asarray(to_zigzag(jnp.asarray(a), cp))
    out = run(per_shard, cp, (P(None, "cp"),) * 3, P(None, "cp"), zig(q), zig(k), zig(v))
    got = np.asarray(from_zigzag(out, cp))
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("cp,start", [(1, 0), (2, 0), (4, 0), (4, 384)])
def test_ring_mask_promises_match_the_run_time_chooser(cp, start, monkeypatch):
    """The ring tells the GPU kernel each block's mask form (`visible=`) instead of letting it choose at run
    time. Every promise made must be what the run-time chooser (tokamax_gpu._choose_path, pure jnp) picks
    from the positions themselves, on every rank and step; `start` offsets the piece (chunked prefill)."""
    import pcp_jax.parallel.ring_attention as ring
    from pcp_jax.kernels.attention import tokamax_gpu

    seen = []

    def record(visible, choice):
        seen.append((visible, tokamax_gpu.PATHS[int(choice)]))

    def checked_block(q, k, v, q_pos, k_pos, *, causal, kernels, visible="auto"):
        _, _, exact = tokamax_gpu._key_ranges(q_pos, k_pos, causal)
        jax.debug.callback(functools.partial(record, visible), tokamax_gpu._choose_path(q_pos, k_pos, causal, exact))
        return attention_block(q, k, v, q_pos, k_pos, causal=causal, kernels=kernels)

    monkeypatch.setattr(ring, "attention_block", checked_block)
    B, lc, H, D = 2, 64, 2, 8
    T = 2 * cp * lc
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(3))

    def per_shard(q, k, v):
        rank = jax.lax.axis_index("cp")
        pos = jnp.broadcast_to(start + local_positions(rank, cp, lc), (B, 2 * lc))
        ctx = ShardContext("cp", cp, "sequence", "jnp", rank, pos, jnp.full((B,), start + T - 5, jnp.int32))
        return ring.ring_attention(q, k, v, ctx)[0]

    run(per_shard, cp, (P(None, "cp"),) * 3, P(None, "cp"), q, k, v)
    jax.effects_barrier()
    expected = {"diagonal": "causal", "all": "plain"}
    assert len(seen) == cp * (3 + (cp - 1))  # three blocks at step 0, one per later step, on each rank
    assert all(expected[promise] == chosen for promise, chosen in seen), seen

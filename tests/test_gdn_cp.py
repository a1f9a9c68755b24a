"""Gated DeltaNet across ranks: both strategies (conv1d with halos + recurrence) equal the serial
computation over the whole sequence, from a non-zero initial conv and recurrent state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pcp_jax.kernels.gdn.reference import naive_gated_delta_rule
from pcp_jax.parallel.context import ShardContext
from pcp_jax.parallel.gdn_cp import causal_conv, gdn_batch, gdn_sequence, split_heads
from pcp_jax.parallel.zigzag import from_zigzag, local_positions, to_zigzag
from hf_models import rel_err
from shard import run
from tiny import tiny_config


def serial(qkv, g, beta, w, cfg, conv0, s0):
    conv = causal_conv(qkv, w, conv0)
    q, k, v = split_heads(conv, cfg)
    return naive_gated_delta_rule(q, k, v, g, beta, s0)


@pytest.mark.parametrize("strategy,cp", [("sequence", 1), ("sequence", 2), ("sequence", 4), ("batch", 2),
                                         ("batch", 4)])
def test_strategies_equal_serial_with_initial_state(strategy, cp):
    cfg = tiny_config()
    rng = np.random.default_rng(cp)
    B, lc = (cp if strategy == "batch" else 1) * 2, 64
    T = 2 * cp * lc
    H = cfg.linear_num_value_heads
    qkv = rng.normal(size=(B, T, cfg.conv_dim)).astype(np.float32)
    g = (-np.abs(rng.normal(size=(B, T, H))) * 0.3).astype(np.float32)
    beta = rng.uniform(size=(B, T, H)).astype(np.float32)
    w = rng.normal(size=(cfg.conv_kernel, cfg.conv_dim)).astype(np.float32)
    conv0 = rng.normal(size=(B, cfg.conv_kernel - 1, cfg.conv_dim)).astype(np.float32)
    s0 = rng.normal(size=(B, H, cfg.linear_key_head_dim, cfg.linear_value_head_dim)).astype(np.float32)
    o_ref, s_ref = serial(qkv, g, beta, w, cfg, conv0, s0)
    run_fn = gdn_batch if strategy == "batch" else gdn_sequence

    def per_shard(qkv, g, beta, w, conv0, s0):
        rank = jax.lax.axis_index("cp") if cp > 1 else jnp.int32(0)
        pos = jnp.broadcast_to(local_positions(rank, cp, lc), (B, 2 * lc))
        ctx = ShardContext("cp", cp, strategy, "jnp", rank, pos, jnp.full((B,), T, jnp.int32))
        return run_fn(qkv, g, beta, w, ctx, cfg, conv0, s0)[:2]

    zig = lambda a: np.asarray(to_zigzag(jnp.asarray(a), cp))
    seq = P(None, "cp")
    o, s = run(per_shard, cp, (seq, seq, seq, P(), P(), P()), (seq, P()),
               zig(qkv), zig(g), zig(beta), w, conv0, s0)
    assert rel_err(np.asarray(from_zigzag(o, cp)), o_ref) <= 1e-5
    assert rel_err(s, s_ref) <= 1e-5


def test_sequence_strategy_hands_bf16_values_to_the_kernel(monkeypatch):
    """A bf16 model must reach the GDN kernel with bf16 values under `sequence` too: [v | 0] built in fp32
    once sent it down the kernels' exact-fp32 path, 177x slower on an H100 (docs/BENCHMARKS.md)."""
    import pcp_jax.parallel.gdn_cp as gdn_cp

    seen = []
    real = gdn_cp.gated_delta_rule

    def recording(q, k, v, *args, **kw):
        seen.append(v.dtype)
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(gdn_cp, "gated_delta_rule", recording)
    cfg, cp, B, lc = tiny_config(), 2, 1, 64
    T, H = 2 * cp * lc, cfg.linear_num_value_heads
    rng = np.random.default_rng(7)
    qkv = rng.normal(size=(B, T, cfg.conv_dim)).astype(np.float32)
    g = (-np.abs(rng.normal(size=(B, T, H))) * 0.3).astype(np.float32)
    beta = rng.uniform(size=(B, T, H)).astype(np.float32)
    w = rng.normal(size=(cfg.conv_kernel, cfg.conv_dim)).astype(np.float32)
    conv0 = np.zeros((B, cfg.conv_kernel - 1, cfg.conv_dim), np.float32)
    s0 = np.zeros((B, H, cfg.linear_key_head_dim, cfg.linear_value_head_dim), np.float32)
    o_ref, _ = serial(qkv, g, beta, w, cfg, conv0, s0)

    def per_shard(qkv, g, beta, w, conv0, s0):
        rank = jax.lax.axis_index("cp")
        pos = jnp.broadcast_to(local_positions(rank, cp, lc), (B, 2 * lc))
        ctx = ShardContext("cp", cp, "sequence", "jnp", rank, pos, jnp.full((B,), T, jnp.int32))
        return gdn_sequence(qkv, g, beta, w, ctx, cfg, conv0, s0)[:2]

    bf = lambda a: np.asarray(to_zigzag(jnp.asarray(a, jnp.bfloat16), cp))
    seq = P(None, "cp")
    o, _ = run(per_shard, cp, (seq, seq, seq, P(), P(), P()), (seq, P()), bf(qkv), np.asarray(to_zigzag(g, cp)),
               np.asarray(to_zigzag(beta, cp)), jnp.asarray(w, jnp.bfloat16), conv0, s0)
    assert seen and all(d == jnp.bfloat16 for d in seen), seen
    assert rel_err(np.asarray(from_zigzag(o, cp), np.float32), o_ref) <= 2e-2

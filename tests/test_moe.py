"""MoE: the layer matches a plain per-token reference (with and without renormalised top-k), expert-parallel
shards sum to the whole layer, the tiled grouped matmul is exact, dispatch (sort_by_expert) and combine
(combine_experts) match their plain definitions, and the work follows the routed tokens, not the number of
experts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax.kernels.moe.reference import grouped_matmul, num_tiles_bound
from pcp_jax.model import MoE
from pcp_jax.parallel.expert_dispatch import combine_experts, sort_by_expert
from pcp_jax.parallel.context import ShardContext
from pcp_jax.parallel.tensor import local_config
from pcp_jax.weights import declare
from tiny import tiny_config, tiny_params


@pytest.mark.parametrize("sizes", [[3, 0, 70, 1, 10], [0, 0, 0, 0, 1], [64, 64, 0, 0, 0]])
def test_grouped_matmul_exact(sizes):
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    E, K, N = len(sizes), 8, 6
    M = sum(sizes) + 5  # trailing rows beyond the groups come back as zeros
    lhs = rng.normal(size=(M, K)).astype(np.float32)
    rhs = rng.normal(size=(E, K, N)).astype(np.float32)
    out = np.asarray(grouped_matmul(lhs, rhs, jnp.asarray(sizes), tile=16))
    ref = np.zeros((M, N), np.float32)
    start = 0
    for e, n in enumerate(sizes):
        ref[start:start + n] = lhs[start:start + n] @ rhs[e]
        start += n
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first,count", [(0, 9), (3, 4), (8, 1)])
def test_sort_by_expert(first, count):
    """Stable sort by local expert with other shards' experts last; slot inverts order; group sizes count."""
    T, k, E = 23, 3, 9
    rng = np.random.default_rng(first + count)
    top_e = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    order, slot, sizes = (np.asarray(a) for a in sort_by_expert(jnp.asarray(top_e), first, count))
    flat = top_e.reshape(-1)
    local = np.where((flat >= first) & (flat < first + count), flat - first, count)
    np.testing.assert_array_equal(order, np.argsort(local, kind="stable"))
    np.testing.assert_array_equal(slot.reshape(-1)[order], np.arange(T * k))
    np.testing.assert_array_equal(sizes, np.bincount(local, minlength=count + 1)[:count])
    assert sizes.dtype == np.int32 and slot.shape == (T, k)


def test_combine_experts_ignores_rows_of_other_shards():
    """out[t] = Σ_j w[t, j] y[slot[t, j]] over the rows computed here; rows past `routed` (other shards'
    experts) hold NaN and must not leak; bf16 rows are summed in fp32 and rounded once."""
    T, k, D = 7, 3, 5
    rng = np.random.default_rng(0)
    slot = rng.permutation(T * k).reshape(T, k).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    routed = 15
    y = rng.normal(size=(T * k, D)).astype(np.float32)
    y[routed:] = np.nan
    ref = np.zeros((T, D), np.float64)
    for t in range(T):
        for j in range(k):
            if slot[t, j] < routed:
                ref[t] += w[t, j] * y[slot[t, j]]
    got = np.asarray(combine_experts(jnp.asarray(y), jnp.asarray(slot), jnp.asarray(w), routed))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    yb = jnp.asarray(y, jnp.bfloat16)
    got_b = combine_experts(yb, jnp.asarray(slot), jnp.asarray(w), routed)
    ref_b = np.zeros((T, D), np.float64)
    for t in range(T):
        for j in range(k):
            if slot[t, j] < routed:
                ref_b[t] += w[t, j] * np.asarray(yb[slot[t, j]], np.float64)
    assert got_b.dtype == jnp.bfloat16
    once = jnp.asarray(ref_b, jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got_b, np.float32), np.asarray(once, np.float32))


def _ctx(tp_rank=0):
    """The context a MoE layer reads (its kernels and its rank on `tp`), for a layer called outside a shard_map:
    tp = 1, so nothing is reduced."""
    zeros = jnp.zeros((1, 1), jnp.int32)
    return ShardContext("cp", 1, "sequence", "jnp", 0, zeros, jnp.ones((1,), jnp.int32), tp_rank=tp_rank)


def test_expert_parallel_shards_sum_to_the_whole_layer():
    """Split 8 experts over 4 ranks (2 each) and the shared expert's columns 4 ways: every rank routes every
    token and runs only its own experts; the 4 partial outputs sum to the unsplit layer."""
    tp = 4
    cfg = tiny_config(moe=True, shared_expert_intermediate_size=32, vocab_size=72)
    params = tiny_params(cfg, seed=3)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 13, cfg.hidden_size)).astype(np.float32))
    whole = np.asarray(MoE(cfg, params, "layers.0.moe", jnp.float32)(x, _ctx()))
    local, declared = local_config(cfg, tp), declare(cfg)
    total = np.zeros_like(whole)
    for r in range(tp):
        shard = {}
        for name, v in params.items():
            if not name.startswith("layers.0.moe."):
                continue
            split = declared[name].tp
            shard[name] = v if split is None else np.split(v, tp, axis=split.axis)[r]
        total += np.asarray(MoE(local, shard, "layers.0.moe", jnp.float32)(x, _ctx(r)))
    np.testing.assert_allclose(total, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_moe_layer_matches_per_token_reference(norm_topk):
    cfg = tiny_config(moe=True, norm_topk_prob=norm_topk)
    params = tiny_params(cfg)
    layer = MoE(cfg, params, "layers.0.moe", jnp.float32)
    x = np.random.default_rng(0).normal(size=(3, 11, cfg.hidden_size)).astype(np.float32)
    got = np.asarray(layer(jnp.asarray(x), _ctx()))
    p = {k.split("layers.0.moe.")[1]: v for k, v in params.items() if k.startswith("layers.0.moe.")}
    silu = lambda a: a / (1 + np.exp(-a))
    ref = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:2]):
        t = x[idx].astype(np.float64)
        logits = t @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: cfg.num_experts_per_tok]
        w = probs[top] / (probs[top].sum() if norm_topk else 1.0)
        y = sum(wi * (silu(t @ p["gate_proj"][e]) * (t @ p["up_proj"][e])) @ p["down_proj"][e] for wi, e in zip(w, top))
        shared = (silu(t @ p["shared.gate_proj"]) * (t @ p["shared.up_proj"])) @ p["shared.down_proj"]
        ref[idx] = y + shared / (1 + np.exp(-(t @ p["shared_gate"])))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def _array_shapes(hlo: str):
    return [tuple(int(d) for d in s.split(",") if d) for s in re.findall(r"[a-z]\d+\[([\d,]*)\]", hlo)]


def test_moe_work_follows_routed_tokens_not_experts():
    """No array of the compiled layer pairs the experts axis with a tokens axis and a feature axis
    (that would be a dense all-experts product), and the tile loop's trip count is bounded by the
    routed rows, independent of the number of experts once E exceeds them."""
    T, D, F, k = 37, 40, 24, 2
    for E in (16, 128):
        cfg = tiny_config(moe=True, hidden_size=D, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=F,
                          shared_expert_intermediate_size=0)
        layer = MoE(cfg, tiny_params(cfg), "layers.0.moe", jnp.float32)
        hlo = jax.jit(lambda x: layer(x, _ctx())).lower(jnp.zeros((T, D))).compile().as_text()
        token_dims, feature_dims = {T, T * k}, {D, F, 2 * F}
        for shape in _array_shapes(hlo):
            if E in shape and token_dims & set(shape):
                assert not feature_dims & set(shape), f"dense expert product of shape {shape} (E={E})"
    assert num_tiles_bound(T * k, 128, 64) == num_tiles_bound(T * k, 10_000, 64)
    assert num_tiles_bound(1 * k, 512, 64) <= 3  # a decode step touches at most its k experts' tiles

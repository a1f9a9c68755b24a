"""Gated delta rule: chunked == naive recurrence == transformers' torch functions (fp32), with and
without an initial state, qk/v head ratio 1 and > 1, lengths that are not multiples of the chunk; and
padding tokens (g = beta = 0) leave the state unchanged."""

import numpy as np
import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule

from pcp_jax.kernels.gdn.reference import chunk_gated_delta_rule, gated_delta_rule_step, naive_gated_delta_rule
from hf_models import rel_err


def inputs(rng, B, T, Hk, G, dk, dv, with_state):
    l2 = lambda x: x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    q = l2(rng.normal(size=(B, T, Hk, dk))).astype(np.float32)
    k = l2(rng.normal(size=(B, T, Hk, dk))).astype(np.float32)
    v = rng.normal(size=(B, T, Hk * G, dv)).astype(np.float32)
    g = (-np.abs(rng.normal(size=(B, T, Hk * G))) * 0.5).astype(np.float32)
    beta = rng.uniform(size=(B, T, Hk * G)).astype(np.float32)
    s0 = rng.normal(size=(B, Hk * G, dk, dv)).astype(np.float32) if with_state else None
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T", [1, 63, 64, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive_equals_transformers(G, T, with_state):
    rng = np.random.default_rng(T * 3 + G + with_state)
    q, k, v, g, beta, s0 = inputs(rng, 2, T, 2, G, 16, 8, with_state)
    o_n, s_n = naive_gated_delta_rule(q, k, v, g, beta, s0)
    o_c, s_c = chunk_gated_delta_rule(q, k, v, g, beta, s0)
    assert rel_err(o_c, o_n) <= 1e-5 and rel_err(s_c, s_n) <= 1e-5
    t = lambda a: None if a is None else torch.from_numpy(a)
    o_h, s_h = torch_chunk_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), initial_state=t(s0),
                                            output_final_state=True)
    o_r, s_r = torch_recurrent_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), initial_state=t(s0),
                                                output_final_state=True)
    for o, s in ((o_h, s_h), (o_r, s_r)):
        assert rel_err(o_n, o.numpy()) <= 1e-5 and rel_err(s_n, s.numpy()) <= 1e-5


def test_padding_tokens_leave_state_unchanged():
    rng = np.random.default_rng(0)
    q, k, v, g, beta, s0 = inputs(rng, 1, 100, 2, 2, 16, 8, True)
    g[:, 70:], beta[:, 70:] = 0.0, 0.0
    _, s_full = chunk_gated_delta_rule(q, k, v, g, beta, s0)
    _, s_prefix = naive_gated_delta_rule(q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70], s0)
    assert rel_err(s_full, s_prefix) <= 1e-5


def test_decode_step_continues_the_recurrence():
    rng = np.random.default_rng(1)
    q, k, v, g, beta, s0 = inputs(rng, 2, 9, 2, 2, 16, 8, True)
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, s0)
    _, s = chunk_gated_delta_rule(q[:, :8], k[:, :8], v[:, :8], g[:, :8], beta[:, :8], s0)
    o, s = gated_delta_rule_step(q[:, 8], k[:, 8], v[:, 8], g[:, 8], beta[:, 8], s)
    assert rel_err(o, o_ref[:, 8]) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


def test_captured_states_equal_the_recurrence_over_each_prefix():
    """`capture`: the state after each asked number of tokens (any order, -1 none, the end included) equals
    the naive recurrence over that prefix, and the outputs and final state are those without capture."""
    rng = np.random.default_rng(5)
    q, k, v, g, beta, s0 = inputs(rng, 2, 200, 2, 2, 16, 8, True)
    capture = np.array([[128, 0, -1], [256, 64, 192]], np.int32)  # 256 > 200: the final state
    o, s, kept = chunk_gated_delta_rule(q, k, v, g, beta, s0, capture=capture)
    o0, s0_out = chunk_gated_delta_rule(q, k, v, g, beta, s0)
    np.testing.assert_array_equal(o, o0)
    np.testing.assert_array_equal(s, s0_out)
    for b in range(2):
        for j, t in enumerate(capture[b]):
            if t < 0:
                assert not np.any(kept[b, j])
                continue
            t = min(int(t), 200)
            want = s0[b] if t == 0 else naive_gated_delta_rule(q[b:b + 1, :t], k[b:b + 1, :t], v[b:b + 1, :t],
                                                               g[b:b + 1, :t], beta[b:b + 1, :t], s0[b:b + 1])[1][0]
            assert rel_err(kept[b, j], want) <= 1e-5, (b, t)

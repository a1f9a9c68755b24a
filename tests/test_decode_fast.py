"""Faster decode paths against the current ones, in fp32 on CPU: attention split along the cache length
(kernels/attention/decode.py) against the one-softmax reference, and whole decode steps of a tiny model
with each `decode_attention` method against "dense" (cp = 1 and cp = 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax.engine import Model, make_mesh, to_host
from pcp_jax.kernels.attention import reference
from pcp_jax.kernels.attention.api import decode_attention
from pcp_jax.kernels.attention.decode import split_attention, split_block
from tiny import decode_trace, tiny_config, tiny_params


def _case(seed, B=2, S=96, Hq=8, Hkv=2, D=16, empty_from=None):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, 1, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, Hkv, D)) * 2, jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, Hkv, D)), jnp.float32)
    kpos = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    kpos[0, empty_from or S:] = -1  # row 0: empty slots at the end (decode room)
    kpos[1, 5:9] = -1  # row 1: a hole
    q_pos = np.array([[40], [S - 1]], np.int32)  # row 0 sees keys 0..40 only
    return q, k, v, q_pos, jnp.asarray(kpos)


@pytest.mark.parametrize("form", ["dot", "sum"])
@pytest.mark.parametrize("block", [8, 32, 96])
def test_split_attention_matches_reference(form, block):
    q, k, v, q_pos, kpos = _case(0, empty_from=70)
    want_out, want_lse = reference.attention_block(q, k, v, q_pos, kpos, causal=True)
    out, lse = split_attention(q, k, v, q_pos, kpos, block=block, form=form)
    np.testing.assert_allclose(out, want_out, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-6, atol=2e-6)


def test_split_attention_blocks_and_rows_that_see_nothing():
    """Whole blocks of empty slots give no partial (and no NaN); a row that sees no key gives out 0,
    lse -inf, like the reference."""
    q, k, v, q_pos, kpos = _case(1)
    kpos = kpos.at[0].set(-1).at[1, 32:].set(-1)
    want_out, want_lse = reference.attention_block(q, k, v, q_pos, kpos)
    for form in ("dot", "sum"):
        out, lse = split_attention(q, k, v, q_pos, kpos, block=16, form=form)
        assert np.all(np.asarray(out[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
        np.testing.assert_allclose(out, want_out, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(lse, want_lse, rtol=2e-6, atol=2e-6)


def test_split_attention_bf16_cache_close_to_fp32():
    q, k, v, q_pos, kpos = _case(2, S=128)
    want, _ = reference.attention_block(q, k, v, q_pos, kpos)
    bf = lambda a: a.astype(jnp.bfloat16)
    for method in ("dense", "split", "split-sum"):
        out, _ = decode_attention(bf(q), bf(k), bf(v), q_pos, kpos, method=method, block=32)
        assert np.max(np.abs(np.asarray(out) - np.asarray(want))) < 3e-2, method


def test_split_block_divides_and_bounds():
    for slots in (64, 320, 448, 8192 + 1024, 5 * 2**14, 7 * 2**15):
        b = split_block(slots)
        assert slots % b == 0 and b & (b - 1) == 0 and b <= max(64, slots // 64)
        assert b >= min(64, slots) or slots % (2 * b)  # never smaller than needed
    assert split_block(7 * 2**15) == 2048 and split_block(320) == 64
    with pytest.raises(ValueError, match="must divide"):
        split_attention(*_case(0), block=7)
    with pytest.raises(ValueError, match="method="):
        decode_attention(*_case(0), method="flash")


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, tiny_params(cfg, seed=3)


@pytest.mark.parametrize("cp", [1, 2])
def test_decode_methods_agree_with_dense(tiny, cp):
    """Greedy decode traces (tokens and every step's logits) of the split methods equal the dense one's."""
    cfg, params = tiny
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 150))
    model = Model(cfg, params, mesh=make_mesh(cp), dtype="float32", kernels="jnp")
    want_toks, want_logits = decode_trace(model, ids, 6)
    for method in ("split", "split-sum"):
        model.decode_attention = method
        toks, logits = decode_trace(model, ids, 6)
        np.testing.assert_array_equal(toks, want_toks)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_bad_decode_attention_is_refused(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="decode_attention='flash'"):
        Model(cfg, params, cp=1, dtype="float32", decode_attention="flash")


def test_decode_step_after_method_switch_continues_the_same_cache(tiny):
    """Switching the method mid-generation reads the cache the other method wrote (one cache layout)."""
    cfg, params = tiny
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 70))
    model = Model(cfg, params, cp=1, dtype="float32", kernels="jnp")
    ref = model.prefill(ids, max_new_tokens=4)
    mixed = model.prefill(ids, max_new_tokens=4)
    for step, method in enumerate(("dense", "split-sum", "split")):
        tok = np.array([step + 1], np.int32)
        model.decode_attention = "dense"
        want = to_host(model.decode_step(ref, tok, step))
        model.decode_attention = method
        got = to_host(model.decode_step(mixed, tok, step))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(ref.caches) == jax.tree.structure(mixed.caches)

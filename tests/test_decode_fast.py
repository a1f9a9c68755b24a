"""Faster decode paths against the current ones, in fp32 on CPU: attention split along the cache length
(kernels/attention/decode.py) and the Pallas kernel that reads the stacked cache in place
(kernels/attention/decode_pallas.py, through the Pallas interpreter, which starts outputs as NaN) against
the one-softmax reference, and whole decode steps of a tiny model with each `decode_attention` method
against "dense" (cp = 1 and cp = 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax.engine import Model, to_host
from pcp_jax.sharding import make_mesh
from pcp_jax.kernels.attention import reference
from pcp_jax.kernels.attention.api import decode_attention
from pcp_jax.kernels.attention import decode_pallas
from pcp_jax.kernels.attention.decode import split_attention, split_block
from test_kernels_gpu_interpret import _lower_for_h100
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


def _stacked(seed, N=3, dtype=jnp.float32, **kw):
    """The _case of layer 1 inside a stack of N layers whose other layers hold other values."""
    q, k, v, q_pos, kpos = _case(seed, **kw)
    rng = np.random.default_rng(seed + 100)
    other = lambda a: jnp.asarray(rng.normal(size=(N,) + a.shape), jnp.float32).at[1].set(a).astype(dtype)
    return q.astype(dtype), other(k), other(v), q_pos, kpos


@pytest.mark.parametrize("layer,used,splits", [(1, 96, None), (1, 71, 3), (1, 96, 1), (1, 96, 5), (0, 40, 4)])
def test_pallas_decode_matches_reference(layer, used, splits):
    """Every layer of the stack, `used` bounds that cut a block or leave whole splits with nothing to read,
    one split or several; row 0 has empty slots from 70 on and sees keys 0..40, row 1 has a hole."""
    q, k, v, q_pos, kpos = _stacked(7, empty_from=70)
    if used < 96:
        kpos = kpos.at[:, used:].set(-1)  # the promise: slots past `used` are empty
    want_out, want_lse = decode_pallas.reference(q, k, v, layer, q_pos, kpos)
    out, lse = decode_pallas.stacked_decode_attention(q, k, v, layer, q_pos, kpos, used=used, splits=splits,
                                                      interpret=True)
    np.testing.assert_allclose(out, want_out, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-6, atol=2e-6)


def test_pallas_decode_rows_that_see_nothing_and_bf16():
    q, k, v, q_pos, kpos = _stacked(8)
    kpos = kpos.at[0].set(-1)
    out, lse = decode_pallas.stacked_decode_attention(q, k, v, 2, q_pos, kpos, interpret=True)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    want, _ = decode_pallas.reference(q, k, v, 2, q_pos, kpos)
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6)
    bf = lambda a: a.astype(jnp.bfloat16)
    out_bf, _ = decode_pallas.stacked_decode_attention(bf(q), bf(k), bf(v), 2, q_pos, kpos, interpret=True)
    assert np.max(np.abs(np.asarray(out_bf) - np.asarray(want))) < 3e-2


def test_pallas_decode_refuses_unsupported_shapes_and_lowers_for_hopper():
    q, k, v, q_pos, kpos = _stacked(9)
    with pytest.raises(NotImplementedError, match="head dim"):
        decode_pallas.check_supported(q[..., :12], k[..., :12])
    with pytest.raises(NotImplementedError, match="multiple of 16"):
        decode_pallas.check_supported(q, k[:, :, :90])
    S = jax.ShapeDtypeStruct  # the 9B's shapes at 32k context: bf16, hd 256, 16 q / 4 kv heads, 8 layers
    args = (S((1, 1, 16, 256), jnp.bfloat16), S((8, 1, 40960, 4, 256), jnp.bfloat16),
            S((8, 1, 40960, 4, 256), jnp.bfloat16), S((), jnp.int32), S((1, 1), jnp.int32),
            S((1, 40960), jnp.int32), S((), jnp.int32))
    fn = lambda q, k, v, layer, qp, kp, used: decode_pallas.stacked_decode_attention(q, k, v, layer, qp, kp,
                                                                                      used=used)
    assert _lower_for_h100(fn, *args).count("__gpu$xla.gpu.triton") == 1


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
    cfg = tiny_config(vocab_size=68)  # even: tp = 2 splits it
    return cfg, tiny_params(cfg, seed=3)


@pytest.mark.parametrize("cp,tp", [(1, 1), (2, 1), (1, 2)])
def test_decode_methods_agree_with_dense(tiny, cp, tp, monkeypatch):
    """Greedy decode traces (tokens and every step's logits) of the split methods and of the Pallas kernel
    (interpreted) equal the dense one's, also with the cache split over cp ranks or its kv heads over tp."""
    cfg, params = tiny
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 150))
    model = Model(cfg, params, mesh=make_mesh(cp, tp), dtype="float32", kernels="jnp")
    assert model.decode_attention == "dense"  # "auto" without GPU kernels
    want_toks, want_logits = decode_trace(model, ids, 6)
    calls = []
    kernel = decode_pallas.stacked_decode_attention
    monkeypatch.setattr(decode_pallas, "stacked_decode_attention",
                        lambda *a, **kw: (kernel(*a, **kw), calls.append(1))[0])  # counts runs without fallback
    for method in ("split", "split-sum", "pallas"):
        model.decode_attention = method
        toks, logits = decode_trace(model, ids, 6)
        np.testing.assert_array_equal(toks, want_toks)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert calls, "the Pallas kernel never ran (a fallback to dense would pass the comparison)"


def test_bad_decode_attention_is_refused(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="decode_attention='flash'; expected one of .'auto', 'dense'"):
        Model(cfg, params, cp=1, dtype="float32", decode_attention="flash")


def test_cli_decode_attention_choices_are_the_models():
    """`--decode-attention` offers exactly what Model accepts (the CLI lists them without importing JAX)."""
    from pcp_jax.cli import build_parser
    from pcp_jax.kernels.attention.api import DECODE_METHODS

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                  if a.dest == "decode_attention")
    assert action.choices == ["auto", *DECODE_METHODS] and action.default == "auto"


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

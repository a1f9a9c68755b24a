"""Engine-side defects of issue 14: full-sequence logits with the prefix cache on, prefix-cache keys of
models that differ only by a permutation of weights, and bad generate/decode_step arguments (each a
one-line ValueError naming the value, raised before any work). Also: the scanned and unrolled decode
layouts agree."""

import dataclasses

import numpy as np
import pytest

from pcp_jax.engine import Model, to_host
from pcp_jax.prefix_cache import fingerprint
from hf_models import rel_err
from tiny import tiny_config, tiny_params


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    params = tiny_params(cfg, seed=11)
    return cfg, params, Model(cfg, params, cp=2, dtype="float32")


def test_logits_are_complete_with_the_prefix_cache_on(tiny):
    cfg, params, _ = tiny
    model = Model(cfg, params, cp=2, dtype="float32")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (1, 160))
    whole = rng.integers(0, cfg.vocab_size, (1, 256))  # two whole 128-token pieces: a full hit the second time
    cold = {160: model.logits(ids, chunk_size=128), 256: model.logits(whole, chunk_size=128)}
    model.enable_prefix_cache(1 << 30)
    for x in (ids, ids, whole, whole):
        model.prefill(x, chunk_size=128)  # fills the cache, then hits it
        got = model.logits(x, chunk_size=128)
        assert got.shape == (1, x.shape[1], cfg.vocab_size)
        np.testing.assert_allclose(got, cold[x.shape[1]], rtol=0, atol=1e-6)
    assert model.prefix_cache_stats()["hits"] >= 2


def test_prefix_cache_keys_differ_for_permuted_weights(tiny):
    """Two models whose embeddings differ by a swap of two rows (the same per-tensor sums) never share
    prefix-cache entries."""
    cfg, params, _ = tiny
    swapped = dict(params)
    emb = params["embed"].copy()
    emb[[3, 5]] = emb[[5, 3]]
    swapped["embed"] = emb
    a, b = Model(cfg, params, cp=2, dtype="float32"), Model(cfg, swapped, cp=2, dtype="float32")
    assert fingerprint(a) != fingerprint(b)
    ids = np.tile(np.arange(3, 7), 64)[None]  # uses both swapped rows
    cold_b = to_host(b.prefill(ids, chunk_size=128).logits)
    cache = a.enable_prefix_cache(1 << 30)
    b.enable_prefix_cache(cache=cache)
    a.prefill(ids, chunk_size=128)
    np.testing.assert_array_equal(to_host(b.prefill(ids, chunk_size=128).logits), cold_b)
    assert cache.stats()["hits"] == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
    (dict(temperature=float("inf")), "temperature=inf must be a finite number"),
    (dict(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
    (dict(top_k=68), r"top_k=68 must be an integer in 1\.\.67"),
    (dict(top_k=2.5), r"top_k=2\.5 must be an integer"),
    (dict(top_p=0.0), r"top_p=0\.0 must be a number in \(0, 1\]"),
    (dict(seed=2**70), r"seed=1180591620717411303424 must be an integer in 0\.\.2\*\*32-1"),
    (dict(seed=-1), "seed=-1 must be an integer"),
    (dict(eos_token_id=-1), r"eos_token_id=-1: -1 is not a token id in \[0, 67\)"),
    (dict(eos_token_id="57"), "eos_token_id='57' must be a token id or a list of token ids"),
    (dict(eos_token_id=[1, 99]), r"eos_token_id=\[1, 99\]: 99 is not a token id"),
    (dict(chunk_size=0), "chunk_size=0 must be a positive integer, 'auto' or None"),
])
def test_generate_rejects_bad_arguments_before_any_work(tiny, kwargs, match):
    _, _, model = tiny
    with pytest.raises(ValueError, match=match):
        model.generate(np.ones((1, 5), np.int32), 3, **kwargs)


def test_decode_step_rejects_bad_steps_tokens_and_batch(tiny):
    cfg, _, model = tiny
    state = model.prefill(np.ones((2, 9), np.int32), max_new_tokens=4)
    for step, match in ((-1, "step=-1 must be a non-negative integer"), (1.0, "step=1.0 must be")):
        with pytest.raises(ValueError, match=match):
            model.decode_step(state, np.zeros(2, np.int32), step)
    with pytest.raises(ValueError, match=rf"token id {cfg.vocab_size} is out of range"):
        model.decode_step(state, np.array([0, cfg.vocab_size]), 0)
    with pytest.raises(ValueError, match=r"tokens must be 2 integer token ids \(one per row\); got shape \(3,\)"):
        model.decode_step(state, np.zeros(3, np.int32), 0)
    logits = to_host(model.decode_step(state, np.zeros(2, np.int32), 0))  # the state is still usable
    assert np.isfinite(logits).all()


def test_huge_requests_are_refused_before_allocating(tiny):
    cfg, params, model = tiny
    with pytest.raises(ValueError, match="needs .* GiB per CPU device"):
        model.generate(np.ones((1, 5), np.int32), 10**9)
    limited = Model(dataclasses.replace(cfg, max_position_embeddings=4096), params, dtype="float32")
    with pytest.raises(ValueError, match="exceeds the model's 4096 positions"):
        limited.generate(np.ones((1, 5), np.int32), 4092)


def test_scanned_and_unrolled_decode_agree(tiny):
    cfg, params, _ = tiny
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 50))
    runs = []
    for scan in (True, False):
        model = Model(cfg, params, cp=2, dtype="float32", scan_decode=scan)
        state = model.prefill(ids, max_new_tokens=4)
        tok, trace = np.zeros(2, np.int32), []
        for step in range(4):
            trace.append(to_host(model.decode_step(state, tok, step)))
            tok = trace[-1].argmax(-1).astype(np.int32)
        runs.append(np.stack(trace))
    assert rel_err(runs[0], runs[1]) <= 1e-6


def test_consumed_params_are_never_held_twice():
    """Stacking the layers makes new arrays: with consume_params the caller's dict gives its tensors up,
    so after the build the live arrays are the model's weights once (without it, twice)."""
    import jax
    cfg = tiny_config(num_layers=8, layer_types=("linear_attention", "full_attention") * 4)
    weights = sum(np.asarray(a).nbytes for a in tiny_params(cfg).values())

    def live_bytes_after_build(consume):  # arrays other tests left alive are not counted
        live = lambda: sum(a.nbytes for a in jax.live_arrays())
        before = live()
        params = {k: jax.numpy.asarray(v) for k, v in tiny_params(cfg).items()}
        model = Model(cfg, params, dtype="float32", consume_params=consume)
        assert (len(params) == 0) == consume
        grown = live() - before
        del model, params
        return grown

    assert live_bytes_after_build(True) <= 1.05 * weights
    assert live_bytes_after_build(False) >= 1.8 * weights

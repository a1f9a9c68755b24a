"""Engine-side defects: full-sequence logits with the prefix cache on, prefix-cache keys of models that
differ only by a permutation of weights, bad generate/decode_step/warmup arguments (each a one-line ValueError
naming the value, raised before any work), and issue 28's engine items (4-7, 11, 12, 17). Also: the scanned
and unrolled decode layouts agree."""

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
    model.enable_prefix_cache(1 << 30, block_tokens=128)
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
    cache = a.enable_prefix_cache(1 << 30, block_tokens=128)
    b.enable_prefix_cache(cache=cache)
    a.prefill(ids, chunk_size=128)
    np.testing.assert_array_equal(to_host(b.prefill(ids, chunk_size=128).logits), cold_b)
    assert cache.stats()["hits"] == 0
    a.prefill(ids, chunk_size=128)
    assert cache.stats()["hits"] == 1  # the same prompt does hit the model that cached it


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


# Issue 28: engine defects ------------------------------------------------------------------------
COMPILES: list[str] = []


def _count_compiles():
    import jax
    if not COMPILES:
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, secs, **_: COMPILES.append(event) if event.endswith("backend_compile_duration") else None)
        COMPILES.append("listening")
    return len(COMPILES)


def test_warmup_checks_max_tokens_before_compiling_and_stays_usable(tiny):
    """Item 4: a huge max_tokens is refused at once (its plans are found from the ladder, never by walking
    lengths), also against the model's positions; item 6: a huge max_new_tokens is refused before compiling
    and leaves the model as it was."""
    import time
    cfg, params, model = tiny
    before = _count_compiles()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="needs .* GiB per CPU device"):
        model.warmup(10**9)
    with pytest.raises(ValueError, match=r"8 prompt tokens \+ 1000000000 new tokens x batch 1 needs .* GiB"):
        model.warmup(8, max_new_tokens=10**9)
    assert time.perf_counter() - t0 < 60 and _count_compiles() == before
    limited = Model(dataclasses.replace(cfg, max_position_embeddings=4096), params, dtype="float32")
    with pytest.raises(ValueError, match="prompt of 40000 tokens .* exceeds the model's 4096 positions"):
        limited.warmup(40000)
    ids = np.random.default_rng(41).integers(0, cfg.vocab_size, (1, 30))
    fresh = Model(cfg, params, cp=2, dtype="float32")
    np.testing.assert_array_equal(model.generate(ids, 3), fresh.generate(ids, 3))  # not broken by the refusals


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_sizes=None), "batch_sizes=None must be a sequence of positive integers"),
    (dict(batch_sizes=(1, 0)), r"batch_sizes=\(1, 0\) must be"),
    (dict(workers=-3), "workers=-3 must be a positive integer or None"),
    (dict(chunk_size=1), "chunk_size=1 is below 128 tokens"),
])
def test_warmup_refuses_bad_arguments(tiny, kwargs, match):
    _, _, model = tiny
    with pytest.raises(ValueError, match=match):
        model.warmup(300, **kwargs)


def test_tiny_chunk_sizes_are_refused(tiny):
    """Item 11: chunk_size=1 on 600 tokens allocated 136x the prompt's KV slots (every piece is padded to
    2*cp*64 slots); pieces below cp*64 tokens are refused, naming the least."""
    _, _, model = tiny
    for chunk in (1, 100):
        with pytest.raises(ValueError, match=f"chunk_size={chunk} is below 128 tokens: at cp=2 every piece "
                                             "occupies 256 KV slots"):
            model.prefill(np.ones((1, 600), np.int32), chunk_size=chunk)


def test_tiny_temperatures_and_top_p_are_greedy_not_garbage(tiny):
    """Item 7: settings are used in float32: a temperature below its range samples greedily, one just above
    stays finite (the logits are shifted before the division), and a top_p that rounds to 0 keeps the most
    likely token."""
    cfg, _, model = tiny
    ids = np.random.default_rng(42).integers(0, cfg.vocab_size, (2, 40))
    greedy = model.generate(ids, 4)
    for settings in (dict(temperature=1e-38), dict(temperature=1e-45), dict(temperature=2e-38, top_p=1e-300),
                     dict(temperature=1.0, top_p=1e-300)):
        np.testing.assert_array_equal(model.generate(ids, 4, seed=3, **settings), greedy, err_msg=str(settings))


def test_warmed_prefix_cache_programs_serve_every_batch_size(tiny):
    """Item 5: with the prefix cache on, warmup(300, batch_sizes=(1, 2)) then a batch of two compiles nothing
    and runs (its block copies were keyed without the batch size: a TypeError)."""
    cfg, params, _ = tiny
    model = Model(cfg, params, cp=2, dtype="float32")
    model.enable_prefix_cache(1 << 26)
    model.warmup(300, batch_sizes=(1, 2), max_new_tokens=2, logits=False, progress=False)
    ids = np.random.default_rng(43).integers(0, cfg.vocab_size, (2, 280))
    before = _count_compiles()
    got = model.generate(ids, 2)
    assert _count_compiles() == before
    np.testing.assert_array_equal(got, Model(cfg, params, cp=2, dtype="float32").generate(ids, 2))


def test_a_shared_prefix_cache_never_crosses_devices(tiny):
    """Item 12: one PrefixCache shared by two models with the same (cp, tp) on different devices: a multi-line
    "incompatible devices" error before; now their entries never cross."""
    import jax
    cfg, params, _ = tiny
    a = Model(cfg, params, cp=2, dtype="float32")
    b = Model(cfg, params, mesh=jax.make_mesh((2,), ("cp",), devices=jax.devices()[2:4]), dtype="float32")
    ids = np.random.default_rng(44).integers(0, cfg.vocab_size, (1, 300))
    cold = to_host(b.prefill(ids, chunk_size=128).logits)
    cache = a.enable_prefix_cache(1 << 26, block_tokens=128)
    b.enable_prefix_cache(cache=cache)
    a.prefill(ids, chunk_size=128)
    np.testing.assert_allclose(to_host(b.prefill(ids, chunk_size=128).logits), cold, rtol=0, atol=1e-6)
    assert cache.stats()["hits"] == 0
    a.prefill(ids, chunk_size=128)
    assert cache.stats()["hits"] == 1  # the same prompt does hit the model that cached it


def test_api_slips_are_one_line_errors(tiny):
    """Item 17's engine cases: each a ValueError naming the value, at the call that made it."""
    import jax
    from jax.sharding import Mesh
    cfg, params, model = tiny
    with pytest.raises(ValueError, match=r"max_bytes=True must be a non-negative integer"):
        model.enable_prefix_cache(True)
    with pytest.raises(ValueError, match="cache= must be a PrefixCache"):
        model.enable_prefix_cache(cache=object())
    with pytest.raises(ValueError, match="decode_attention='bogus'; expected one of"):
        model.decode_attention = "bogus"
    devices = jax.devices()
    with pytest.raises(ValueError, match="the mesh names a device twice"):
        Model(cfg, params, mesh=Mesh(np.array([devices[0], devices[0]]), ("cp",)), dtype="float32")
    with pytest.raises(ValueError, match=r"mesh axes \('cp', 'tp', 'dp'\); expected"):
        Model(cfg, params, mesh=Mesh(np.array(devices[:2]).reshape(1, 1, 2), ("cp", "tp", "dp")), dtype="float32")

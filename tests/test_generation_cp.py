"""Generation under context parallelism: decode over the cp-sharded KV cache, chunked prefill, prefix
cache, ragged batches, streaming, and the input errors of the public API."""

import numpy as np
import pytest

import pcp_jax
from pcp_jax.engine import Model, to_host
from hf_models import build, hf_generate, rel_err
from tiny import decode_trace, tiny_config, tiny_params


@pytest.fixture(scope="module")
def moe_setup():
    cfg = tiny_config(moe=True)
    params = tiny_params(cfg, seed=4)
    return cfg, params


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_decode_under_cp_equals_cp1(moe_setup, cp):
    cfg, params = moe_setup
    ids = np.random.default_rng(cp).integers(0, cfg.vocab_size, (2, 77))
    ref_tok, ref_logits = decode_trace(Model(cfg, params, cp=1, dtype="float32"), ids, 12)
    tok, logits = decode_trace(Model(cfg, params, cp=cp, dtype="float32"), ids, 12)
    np.testing.assert_array_equal(tok, ref_tok)
    assert rel_err(logits, ref_logits) <= 1e-5


@pytest.mark.parametrize("cp", [2, 4])
def test_greedy_generation_under_cp_matches_transformers(cp, tmp_path):
    hf = build(moe=False, seed=21)
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(6).integers(0, hf.config.vocab_size, (2, 40))
    got = pcp_jax.load_model(tmp_path, cp=cp, dtype="float32").generate(ids, 16)
    np.testing.assert_array_equal(got, hf_generate(hf, ids, 16))


@pytest.mark.parametrize("cp,chunks", [(1, (64, 100)), (4, (256, 300))])
def test_chunked_prefill_equals_one_shot(moe_setup, cp, chunks):
    cfg, params = moe_setup
    model = Model(cfg, params, cp=cp, dtype="float32")
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 333))
    ref_logits = model.logits(ids)
    ref_tok, ref_trace = decode_trace(model, ids, 5)
    one_shot = model.prefill(ids)
    for chunk in chunks:  # neither divides the 333-token prompt
        assert rel_err(model.logits(ids, chunk_size=chunk), ref_logits) <= 1e-5, chunk
        state = model.prefill(ids, chunk_size=chunk)
        for name in ("state", "conv"):  # GDN conv and recurrent states carried across pieces
            assert rel_err(to_host(state.caches[name]), to_host(one_shot.caches[name])) <= 1e-5, (chunk, name)
        tok, trace = decode_trace(model, ids, 5, chunk_size=chunk)
        np.testing.assert_array_equal(tok, ref_tok)
        assert rel_err(trace, ref_trace) <= 1e-5, chunk


def test_no_device_holds_the_whole_kv_cache(moe_setup):
    cfg, params = moe_setup
    cp = 4
    model = Model(cfg, params, cp=cp, dtype="float32")
    state = model.prefill(np.zeros((1, 900), np.int32), max_new_tokens=8)
    model.decode_step(state, np.zeros(1, np.int32), 0)
    for arr in (state.caches["k"], state.caches["v"]):  # [attention layers, B, slots, Hkv, hd]
        assert arr.shape[0] == len(cfg.attention_layers)
        assert arr.sharding.spec[2] == "cp"
        shards = arr.addressable_shards
        assert len({s.device for s in shards}) == cp
        assert all(s.data.shape[2] * cp == arr.shape[2] for s in shards)
        assert arr.shape[2] // cp < 900  # each device holds well under the prompt's KV


def test_prefix_cache_entries_never_cross_dtypes_layouts_or_weights(moe_setup):
    """One cache shared by models that differ in dtype, cp, or weights: each hits only its own entries; a
    prompt that ends exactly on a cached boundary is restored whole, its logits included (MoE model)."""
    cfg, params = moe_setup
    a = np.random.default_rng(9).integers(0, cfg.vocab_size, (1, 300))
    model = Model(cfg, params, cp=2, dtype="float32")
    cold = to_host(Model(cfg, params, cp=2, dtype="float32").prefill(a[:, :256]).logits)
    cache = model.enable_prefix_cache(1 << 30, block_tokens=128)
    model.prefill(a)  # keeps the boundaries 128 and 256
    assert rel_err(to_host(model.prefill(a[:, :256]).logits), cold) <= 1e-5  # other padding: fp32 rounding
    assert (cache.stats()["hits"], cache.stats()["tokens_reused"]) == (1, 256)
    for other in (Model(cfg, params, cp=2, dtype="bfloat16"), Model(cfg, params, cp=1, dtype="float32"),
                  Model(cfg, tiny_params(cfg, seed=5), cp=2, dtype="float32")):
        other.enable_prefix_cache(cache=cache)
        other.prefill(a)
    assert cache.stats()["hits"] == 1


def test_ragged_batch_with_eos_and_streaming(moe_setup):
    cfg, params = moe_setup
    model = Model(cfg, params, cp=2, dtype="float32")
    rng = np.random.default_rng(10)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (5, 130, 64)]
    singles = [model.generate(p[None], 10)[0] for p in prompts]
    eos = int(singles[1][len(prompts[1]) + 3])  # row 1 stops after its 4th new token
    seen = []
    out = model.generate(prompts, 10, eos_token_id=eos, callback=lambda step, tok: seen.append(tok))
    assert out.shape == (3, 130 + 10)
    for b, (p, single) in enumerate(zip(prompts, singles)):
        new = out[b, len(p):len(p) + 10]
        ref = single[len(p):]
        stop = np.flatnonzero(ref == eos)
        if stop.size:  # tokens up to and including the first EOS, then EOS padding
            np.testing.assert_array_equal(new[: stop[0] + 1], ref[: stop[0] + 1])
            assert np.all(new[stop[0]:] == eos)
        else:
            np.testing.assert_array_equal(new, ref)
        assert np.all(out[b, len(p) + 10:] == eos)
    assert len(seen) >= 4 and all(t.shape == (3,) for t in seen)
    np.testing.assert_array_equal(np.stack(seen, 1)[1, :4], out[1, 130:134])


def test_sampling_is_seeded(moe_setup):
    cfg, params = moe_setup
    model = Model(cfg, params, cp=1, dtype="float32")
    ids = np.ones((2, 9), np.int32)
    a = model.generate(ids, 8, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    b = model.generate(ids, 8, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)
    assert np.all((a[:, 9:] >= 0) & (a[:, 9:] < cfg.vocab_size))


@pytest.mark.parametrize("bad,message", [
    (np.zeros((1, 0), np.int32), "empty"),
    (np.zeros((4,), np.int32), "shape"),
    (np.zeros((1, 3), np.float32), "integers"),
    (np.array([[1, 2, 67]]), "out of range"),
    (np.array([[-1, 2]]), "out of range"),
    ([], "empty"),
])
def test_bad_inputs_are_clear_errors(moe_setup, bad, message):
    cfg, params = moe_setup
    model = Model(cfg, params, cp=1, dtype="float32")
    with pytest.raises(ValueError, match=message):
        model.generate(bad, 4)
    with pytest.raises(ValueError, match=message):
        model.logits(bad)


def test_bad_arguments_are_clear_errors(moe_setup):
    cfg, params = moe_setup
    model = Model(cfg, params, cp=1, dtype="float32")
    ids = np.ones((1, 4), np.int32)
    for kwargs, message in ((dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                            (dict(top_p=1.5), "top_p"), (dict(chunk_size=0), "chunk_size")):
        with pytest.raises(ValueError, match=message):
            model.generate(ids, 2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, -1)
    state = model.prefill(ids, max_new_tokens=2)
    model.decode_step(state, np.ones(1, np.int32), 0)
    model.decode_step(state, np.ones(1, np.int32), 1)
    with pytest.raises(ValueError, match="exceeds the cache"):
        model.decode_step(state, np.ones(1, np.int32), 500)
    with pytest.raises(ValueError, match="cp=16 needs 16 devices"):
        Model(cfg, params, cp=16)
    with pytest.raises(ValueError, match="dtype"):
        Model(cfg, params, dtype="float16")
    with pytest.raises(ValueError, match="gdn_strategy"):
        Model(cfg, params, gdn_strategy="ring")
    with pytest.raises(ValueError, match="prefix cache is not enabled"):
        model.prefix_cache_stats()


def test_chunked_prefill_with_batch_strategy_and_ragged_rows():
    cfg = tiny_config()
    params = tiny_params(cfg, seed=6)
    prompts = [np.random.default_rng(i).integers(0, cfg.vocab_size, n) for i, n in enumerate((300, 257, 64, 5))]
    ref = Model(cfg, params, cp=1, dtype="float32")
    model = Model(cfg, params, cp=4, dtype="float32", gdn_strategy="batch")
    want, got = ref.logits(prompts), model.logits(prompts, chunk_size=256)
    for b, p in enumerate(prompts):
        assert rel_err(got[b, :len(p)], want[b, :len(p)]) <= 1e-5, b
    np.testing.assert_array_equal(model.generate(prompts, 6, chunk_size=256), ref.generate(prompts, 6))


def test_decode_room_follows_max_new_tokens_not_the_prompt(moe_setup):
    """Room for new tokens is a power of two >= 256 slots per rank and the capacity is rounded up on the
    64-slot ladder, so a long prompt's KV cache is not doubled to make room for a few tokens."""
    cfg, params = moe_setup
    model = Model(cfg, params, cp=2, dtype="float32")
    state = model.prefill(np.zeros((1, 2048), np.int32), max_new_tokens=8)
    assert state.prefill_slots == 1024 and state.slots_per_rank == 1024 + 256
    assert state.caches["k"].shape[2] == 2 * (1024 + 256)
    model.decode_step(state, np.zeros(1, np.int32), 2 * 256 - 1)  # the last reserved slot on rank 1
    with pytest.raises(ValueError, match="exceeds the cache"):
        model.decode_step(state, np.zeros(1, np.int32), 2 * 256)
    assert model.prefill(np.zeros((1, 2048), np.int32), max_new_tokens=600).slots_per_rank == 1024 + 512
    assert model.prefill(np.zeros((1, 2048), np.int32)).slots_per_rank == 1024


def test_decode_after_prefill_equals_generate_and_refuses_beyond_its_room():
    """`Model.decode` continues a prefill's result: the same tokens as `generate` from one prefill."""
    cfg = tiny_config()
    model = Model(cfg, tiny_params(cfg, seed=21), cp=2, dtype="float32")
    ids = np.random.default_rng(21).integers(0, cfg.vocab_size, (2, 50))
    state = model.prefill(ids, max_new_tokens=5)
    np.testing.assert_array_equal(model.decode(state, 5), model.generate(ids, 5)[:, 50:])
    with pytest.raises(ValueError, match="exceeds the room this prefill reserved"):
        model.decode(model.prefill(ids, max_new_tokens=1), 10**6)

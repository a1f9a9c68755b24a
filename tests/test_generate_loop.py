"""`generate`'s decode loop on the device (chunks of decode steps in one program) against the per-token path
(`steps_per_call=1`: one decode program and one sampling program per token, the token through the host):
the same tokens and the same callbacks, greedy and sampled, ragged batches, EOS, cp = 1 and cp = 2; and
after `warmup` the loop compiles nothing."""

import jax
import numpy as np
import pytest

from pcp_jax.engine import CHUNK_STEPS, Model, _chunk_plan, make_mesh, to_host
from tiny import tiny_config, tiny_params

COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)


def test_chunk_plan_is_largest_first_then_single_steps():
    assert CHUNK_STEPS == (16, 4)
    assert _chunk_plan(39, 16) == [16, 16, 4, 1, 1, 1]
    assert _chunk_plan(15, 16) == [4, 4, 4, 1, 1, 1]
    assert _chunk_plan(32, 16) == [16, 16]
    assert _chunk_plan(9, 8) == [4, 4, 1]
    assert _chunk_plan(5, 1) == [1] * 5
    assert _chunk_plan(0, 16) == []


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, tiny_params(cfg, seed=11)


@pytest.fixture(scope="module")
def models(tiny):
    """One model per cp, shared by the tests (each compiles its prefill programs once)."""
    cfg, params = tiny
    return {cp: Model(cfg, params, mesh=make_mesh(cp), dtype="float32") for cp in (1, 2)}


def _run(model, prompts, new, **kw):
    """(output, [(step, tokens)] as the callback saw them)."""
    seen = []
    out = model.generate(prompts, new, callback=lambda step, tok: seen.append((step, tok.tolist())), **kw)
    return out, seen


def _assert_same(model, prompts, new, steps_per_call=16, **kw):
    """The loop's output and callbacks equal the per-token path's; returns the latter."""
    want = _run(model, prompts, new, steps_per_call=1, **kw)
    got = _run(model, prompts, new, steps_per_call=steps_per_call, **kw)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]
    return want


@pytest.mark.parametrize("cp,new,steps_per_call", [(1, 22, 16), (2, 10, 4)])
def test_greedy_loop_equals_per_token_path(tiny, models, cp, new, steps_per_call):
    """A ragged batch (cp = 1: 21 decode steps as 16, 4, then one alone; cp = 2: 4, 4, 1); then EOS that
    ends one row early (the others go on), and EOS that ends every row within a chunk (generation and
    callbacks stop there)."""
    cfg, model = tiny[0], models[cp]
    rng = np.random.default_rng(cp)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (40, 9, 1)]
    _, seen = _assert_same(model, prompts, new, steps_per_call)
    assert len(seen) == new
    tokens = np.array([tok for _, tok in seen]).T  # [B, new]
    others = set(tokens[[0, 2]].ravel().tolist())
    one_row = next(int(t) for t in tokens[1, 1:] if t not in others)  # ends row 1 only
    out, seen = _assert_same(model, prompts, new, steps_per_call, eos_token_id=one_row)
    assert len(seen) == new and out[1, -1] == one_row
    every = sorted({int(tokens[b, 2 + 2 * b]) for b in range(3)})  # each row ends by token 6
    _, seen = _assert_same(model, prompts, new, steps_per_call, eos_token_id=every)
    assert len(seen) <= 7 and all(t in every for t in seen[-1][1])


def test_loop_leaves_the_cache_decode_step_leaves(tiny, models):
    """Each step's K/V lands on the rank and slot `decode_step` puts it (step mod C, prefill slots +
    step div C): slot positions equal exactly, caches and last logits to fp32 rounding."""
    cfg, model = tiny[0], models[2]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (40, 9, 1)]  # the greedy cp = 2 test's programs
    states = [model.prefill(prompts, max_new_tokens=10) for _ in range(2)]
    sampler = model._sampler(states[0], 0.0, None, None, 0, set())
    first = to_host(states[0].logits).argmax(-1).astype(np.int32)
    tokens = [np.concatenate([t for _, t in model._decode_tokens(st, first, 9, sampler, n)], axis=1)
              for st, n in zip(states, (1, 4))]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    np.testing.assert_array_equal(to_host(states[0].kpos), to_host(states[1].kpos))
    for a, b in [(states[0].logits, states[1].logits)] + [(states[0].caches[k], states[1].caches[k])
                                                          for k in states[0].caches]:
        np.testing.assert_allclose(to_host(a), to_host(b), rtol=1e-6, atol=1e-6)


def test_sampled_loop_equals_per_token_path(tiny, models):
    """temperature / top_k / top_p with the per-token path's key schedule, on cp = 2 in chunks of 4."""
    cfg, model = tiny[0], models[2]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (20, 3, 11)]  # the greedy cp = 2 test's programs
    for kw in (dict(temperature=0.8, seed=3), dict(temperature=1.3, top_k=9, top_p=0.8, seed=4)):
        _, seen = _assert_same(model, prompts, 10, steps_per_call=4, **kw)
    eos = seen[3][1][0]  # ends row 0 at token 3 or before
    _, seen = _assert_same(model, prompts, 10, steps_per_call=4, eos_token_id=eos, **kw)
    assert seen[-1][1][0] == eos


def test_warmup_compiles_the_loop_and_bad_steps_per_call_is_refused(tiny):
    cfg, params = tiny
    model = Model(cfg, params, cp=1, dtype="float32")
    with pytest.raises(ValueError, match="steps_per_call=0 must be a positive integer"):
        model.generate(np.ones((1, 5), np.int32), 3, steps_per_call=0)
    model.warmup(60, batch_sizes=(2,), max_new_tokens=6, logits=False, progress=False)
    assert any(k[0] == "chunk" and k[4] == 4 for k in model._fns)
    prompts = [np.arange(50) % cfg.vocab_size, np.arange(7)]
    before = len(COMPILES)
    out = model.generate(prompts, 6)
    assert len(COMPILES) == before, f"{len(COMPILES) - before} programs compiled after warmup"
    np.testing.assert_array_equal(out, model.generate(prompts, 6, steps_per_call=1))

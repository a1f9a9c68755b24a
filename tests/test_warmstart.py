"""Any prompt length from one warm start: scanned layer groups, length buckets, automatic pieces and
`Model.warmup` (its store across processes: tests/test_program_store.py).

After `warmup(N)` prompts of random lengths <= N compile nothing (backend compiles counted with a
`jax.monitoring` listener) and their logits and greedy tokens equal transformers (fp32, <= 1e-5; the
exact-length path at <= 1e-6: tests/test_program_store.py); the compiled prefill does not grow with depth; a layer count that is
not a multiple of the period is exact; `chunk_size="auto"` equals one shot."""


import jax
import numpy as np
import pytest

import pcp_jax
import pcp_jax.memory
from pcp_jax.buckets import Pieces, ladder, ladder_up, plan_pieces
from pcp_jax.engine import Model, to_host
from pcp_jax.model import LayerPlan
from pcp_jax.programs import Prefill
from hf_models import build, hf_greedy, hf_logits, rel_err
from tiny import tiny_config, tiny_params

L, F = "linear_attention", "full_attention"
COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)


def test_ladder_bounds_padding_and_is_a_multiple_of_the_unit():
    unit = 512
    values = ladder(1 << 20, unit)
    assert values[:8] == [unit * i for i in range(1, 9)]
    assert all(v % unit == 0 for v in values) and values == sorted(set(values))
    for n in range(1, 300_000, 97):
        b = ladder_up(n, unit)
        assert b >= n and b in values and (b - n) < max(unit, n / 8), n
    assert len([v for v in values if 65536 < v <= 131072]) == 8  # 8 steps per doubling


def test_layer_plan_groups_periods_and_cache_indices():
    qwen = LayerPlan.of([L, L, L, F] * 8)
    assert (qwen.period, qwen.groups, qwen.rest) == (4, 8, ())
    ten = LayerPlan.of(([L, L, L, F] * 3)[:10])
    assert (ten.period, ten.groups, ten.rest) == (4, 2, (8, 9))
    assert [ten.ordinal(i) for i in range(10)] == [0, 1, 2, 0, 3, 4, 5, 1, 6, 7]
    assert [int(ten.group_index(j, 1)) for j in range(4)] == [3, 4, 5, 1]  # layers 4..7
    assert LayerPlan.of([F, L, L, F, L]).groups == 0  # no period repeats twice: unrolled
    assert LayerPlan.of([F, L, L, L]).groups == 0


def test_auto_pieces_are_equal_ladder_lengths_below_the_budget():
    assert plan_pieces(1000, 2, "auto", 4096) == Pieces(1000, 1024, 1)
    p = plan_pieces(10_000, 2, "auto", 4096)  # three equal pieces of one ladder length
    assert p.count == 3 and p.tokens == p.n_pad <= 4096 and p.n_pad * 3 >= 10_000
    assert plan_pieces(10_000, 2, "auto", 4096, fixed=True) == Pieces(4096, 4096, 3)
    assert plan_pieces(333, 4, 128, 0) == Pieces(128, 512, 3)
    assert plan_pieces(700, 4, None, 0, steps=None) == Pieces(700, 1024, 1)


@pytest.fixture(scope="module")
def hf_ten_layers(tmp_path_factory):
    """Ten layers of the Qwen3.5 pattern: two scanned groups of four, then two unrolled layers."""
    hf = build(seed=15, num_hidden_layers=10)
    path = tmp_path_factory.mktemp("ten_layers")
    hf.save_pretrained(path)
    return hf, str(path)


@pytest.mark.slow
def test_after_warmup_any_length_compiles_nothing_and_is_exact(hf_ten_layers):
    hf, path = hf_ten_layers
    N, new = 1300, 3
    model = pcp_jax.load_model(path, cp=4, dtype="float32")
    assert LayerPlan.of(model.cfg.layer_types).groups == 2
    model.warmup(N, max_new_tokens=new, progress=False)
    rng = np.random.default_rng(15)
    lengths = sorted(rng.choice(np.arange(1, N + 1), 6, replace=False).tolist())
    prompts = [rng.integers(0, hf.config.vocab_size, (1, n)) for n in lengths]
    before = len(COMPILES)
    got = [(model.logits(ids), model.generate(ids, new)) for ids in prompts]
    assert len(COMPILES) == before, f"{len(COMPILES) - before} programs compiled after warmup"
    # (the exact-length path at 15 lengths: tests/test_program_store.py; here the oracle is transformers)
    for ids, (logits, tokens) in zip(prompts, got):
        n = ids.shape[1]
        assert rel_err(logits, hf_logits(hf, ids)) <= 1e-5, n
        np.testing.assert_array_equal(tokens, hf_greedy(hf, ids, new), err_msg=str(n))


def test_layer_count_not_a_multiple_of_the_period_is_exact(hf_ten_layers):
    hf, path = hf_ten_layers
    ids = np.random.default_rng(3).integers(0, hf.config.vocab_size, (2, 150))
    for cp in (1, 2):
        assert rel_err(pcp_jax.load_model(path, cp=cp, dtype="float32").logits(ids), hf_logits(hf, ids)) <= 1e-5, cp


def test_non_periodic_layout_runs_unrolled_and_exact(tmp_path):
    hf = build(seed=16, num_hidden_layers=5, layer_types=[F, L, L, F, L])
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, (1, 90))
    assert rel_err(pcp_jax.load_model(tmp_path, cp=2, dtype="float32").logits(ids), hf_logits(hf, ids)) <= 1e-5


def _hlo_instructions(layers: int) -> int:
    cfg = tiny_config(num_layers=layers, layer_types=(L, L, L, F) * (layers // 4))
    model = Model(cfg, tiny_params(cfg), cp=2, dtype="float32")
    text = model.programs.lower(Prefill(1, 512, 256, False, False)).compile().as_text()
    return sum(" = " in line for line in text.splitlines())


def test_compiled_prefill_does_not_grow_with_depth():
    eight, thirty_two = _hlo_instructions(8), _hlo_instructions(32)
    assert thirty_two <= 1.15 * eight, (eight, thirty_two)


def test_auto_pieces_equal_one_shot_and_warm_up_too():
    cfg = tiny_config()
    params = tiny_params(cfg, seed=6)
    # A budget that fits 512 tokens per piece at cp=2, so longer prompts go in equal pieces.
    per_token = pcp_jax.memory.activation_bytes_per_token(cfg, 4)
    model = Model(cfg, params, cp=2, dtype="float32", prefill_budget_bytes=per_token * 300)
    assert model.auto_piece_tokens == 512
    model.warmup(1100, batch_sizes=(3,), max_new_tokens=2, logits=False, progress=False)
    rng = np.random.default_rng(7)
    prompts = [[rng.integers(0, cfg.vocab_size, n) for n in lengths] for lengths in ((1100, 700, 5), (513, 9, 1))]
    before = len(COMPILES)
    auto = [(to_host(model.prefill(p, max_new_tokens=2).logits), model.generate(p, 2)) for p in prompts]
    assert len(COMPILES) == before, f"{len(COMPILES) - before} programs compiled after warmup"
    for p, (next_logits, tokens) in zip(prompts, auto):
        assert rel_err(next_logits, to_host(model.prefill(p, max_new_tokens=2, chunk_size=None).logits)) <= 1e-5
        np.testing.assert_array_equal(tokens, model.generate(p, 2, chunk_size=None))
    p = prompts[0]  # full-sequence logits in three pieces equal one shot, row by row
    got, want = model.logits(p), model.logits(p, chunk_size=None)
    for b, row in enumerate(p):
        assert rel_err(got[b, :len(row)], want[b, :len(row)]) <= 1e-5

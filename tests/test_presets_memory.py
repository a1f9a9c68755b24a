"""Presets of every Qwen3.5 size, and the memory report: its figures against what the engine allocates."""

import math

import numpy as np
import pytest

from pcp_jax.buckets import STEPS
from pcp_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, PRESETS
from pcp_jax.engine import Model
from pcp_jax.memory import format_memory_report, memory_estimate, prompt_bytes
from pcp_jax.weights import param_shapes
from tiny import tiny_config, tiny_params

# Parameters of the text model (no vision tower, no MTP head), total and active per token, as ranges.
SIZES = {
    "qwen3.5-0.8b": ((0.7e9, 0.9e9), None),
    "qwen3.5-2b": ((1.7e9, 2.1e9), None),
    "qwen3.5-4b": ((3.8e9, 4.6e9), None),
    "qwen3.5-9b": ((8.5e9, 10e9), None),
    "qwen3.5-27b": ((25e9, 29e9), None),
    "qwen3.5-35b-a3b": ((33e9, 37e9), (2.5e9, 4e9)),
    "qwen3.5-122b-a10b": ((115e9, 130e9), (9e9, 11e9)),
    "qwen3.5-397b-a17b": ((3.8e11, 4.1e11), (16e9, 18.5e9)),
}


def _params(cfg) -> int:
    return sum(math.prod(shape) for shape in param_shapes(cfg).values())


@pytest.mark.parametrize("name", sorted(SIZES))
def test_presets_have_the_size_of_their_name(name):
    cfg = PRESETS[name]
    (lo, hi), active = SIZES[name]
    total = _params(cfg)
    assert lo < total < hi, total
    if active:
        idle_experts = (cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
        assert active[0] < total - idle_experts * cfg.num_layers < active[1]
    assert cfg.layer_types == tuple(FULL_ATTENTION if i % 4 == 3 else LINEAR_ATTENTION for i in range(cfg.num_layers))
    assert (cfg.vocab_size, cfg.head_dim, cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.conv_kernel,
            cfg.rope_theta, cfg.partial_rotary_factor, cfg.max_position_embeddings) == (
        248320, 256, 128, 128, 4, 1e7, 0.25, 262144)
    assert cfg.tie_word_embeddings == (name in ("qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b"))


def _tiny_model(cp=1, dtype="float32", **kw):
    cfg = tiny_config()
    return Model(cfg, tiny_params(cfg), cp=cp, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_weight_bytes_are_the_parameters_bytes(dtype, itemsize):
    model = _tiny_model(dtype=dtype)
    params = tiny_params(model.cfg)
    assert model.memory_report()["weights_bytes"] == sum(p.size for p in params.values()) * itemsize


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_kv_and_gdn_bytes_are_what_prefill_allocates(cp):
    model = _tiny_model(cp)
    report = model.memory_report()
    state = model.prefill(np.arange(1, 301)[None] % model.cfg.vocab_size)
    caches = state.caches
    on_one_device = sum(caches[k].addressable_shards[0].data.nbytes for k in ("k", "v"))
    tokens_held = state.slots_per_rank * cp  # every rank holds its 1/cp share of the slots
    assert report["kv_bytes_per_token"] == on_one_device / tokens_held
    assert report["gdn_state_bytes_per_sequence"] == sum(
        caches[k].addressable_shards[0].data.nbytes for k in ("conv", "state"))  # batch 1, replicated


@pytest.mark.parametrize("cp", [1, 2])
def test_estimate_from_the_config_equals_the_report_of_the_model(cp):
    model = _tiny_model(cp, dtype="bfloat16")
    assert memory_estimate(model.cfg, cp=cp) == model.memory_report()
    budget = 64 << 20
    estimate = memory_estimate(model.cfg, cp=cp, budget_bytes=budget)
    sized = _tiny_model(cp, dtype="bfloat16", prefill_budget_bytes=estimate["prefill_budget_bytes"])
    assert estimate == sized.memory_report(budget)


def test_the_longest_prompt_is_the_last_that_fits():
    cfg = tiny_config(max_position_embeddings=1 << 20)
    budget = 48 << 20
    report = memory_estimate(cfg, cp=2, dtype="bfloat16", budget_bytes=budget)
    n, room = report["max_prompt_tokens"], budget - report["weights_bytes"]
    assert 0 < n < cfg.max_position_embeddings
    fits = lambda t: prompt_bytes(cfg, 2, 2, t, report["piece_tokens"], STEPS) <= room
    assert fits(n) and not fits(n + 1)
    assert n * report["kv_bytes_per_token"] <= room
    assert memory_estimate(cfg, cp=2, budget_bytes=1 << 40)["max_prompt_tokens"] == cfg.max_position_embeddings


def test_the_397b_is_sized_before_it_is_loaded():
    cfg = PRESETS["qwen3.5-397b-a17b"]
    one = memory_estimate(cfg, cp=1, budget_bytes=141 << 30)
    assert one["weights_bytes"] == _params(cfg) * 2 and one["max_prompt_tokens"] == 0
    assert "the weights alone exceed the budget" in format_memory_report(one)
    eight = memory_estimate(cfg, cp=8)
    assert eight["kv_bytes_per_token"] == 2 * 15 * 2 * 256 * 2 / 8 and eight["max_prompt_tokens"] is None
    assert "unknown (no budget)" in format_memory_report(eight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget_bytes=0), "budget_bytes=0 must be a positive integer"),
    (dict(budget_bytes=1.5e9), "budget_bytes=1500000000.0 must be a positive integer"),
    (dict(cp=0), "cp=0 must be a positive integer"),
    (dict(dtype="float16"), "dtype='float16'"),
])
def test_estimate_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory_estimate(PRESETS["demo"], **kwargs)

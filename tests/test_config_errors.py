"""Malformed configs fail with one ValueError naming the field and what was expected, never with a
ZeroDivisionError, AttributeError or TypeError from deep inside (issue 14, item 13)."""

from __future__ import annotations

import json

import pytest

from pcp_jax.config import ModelConfig
from tiny import tiny_config


def _hf(**kw):
    d = dict(model_type="qwen3_5_text", vocab_size=10, hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, intermediate_size=16, linear_num_key_heads=1,
             linear_num_value_heads=2, linear_key_head_dim=4, linear_value_head_dim=4)
    d.update(kw)
    return d


@pytest.mark.parametrize("hf,message", [
    (_hf(num_attention_heads=0, head_dim=None), "num_attention_heads=0 must be a positive integer"),
    (_hf(num_attention_heads=0), "num_attention_heads=0 must be a positive integer"),
    (_hf(num_key_value_heads=0), "num_kv_heads=0 must be a positive integer"),
    (_hf(linear_num_key_heads=0), "linear_num_key_heads=0 must be a positive integer"),
    (_hf(full_attention_interval=0), "full_attention_interval=0 must be a positive integer"),
    (_hf(num_hidden_layers="4"), "field 'num_hidden_layers' is '4'; expected an integer"),
    (_hf(hidden_size=8.5), "field 'hidden_size' is 8.5; expected an integer"),
    (_hf(rope_parameters=[1, 2]), "field 'rope_parameters' is a list; expected a JSON object"),
    (_hf(rope_theta=None), "field 'rope_theta' is None; expected a number"),
    (_hf(layer_types="full_attention"), "field 'layer_types' is 'full_attention'; expected a list"),
    (_hf(eos_token_id=["x"]), "field 'eos_token_id' is 'x'; expected an integer"),
    ([_hf()], "config.json must hold a JSON object of fields, got a list"),
    ({"model_type": "qwen3_5", "text_config": [1]}, "field 'text_config' is a list; expected a JSON object"),
])
def test_hf_config_errors_name_the_field(hf, message):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf(hf)
    assert type(err.value) is ValueError and message in str(err.value), str(err.value)


def test_hf_config_file_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_hf_file(path)


def test_integral_floats_are_accepted():
    assert ModelConfig.from_hf(_hf(hidden_size=8.0)).hidden_size == 8


@pytest.mark.parametrize("change,message", [
    (dict(num_heads=0), "num_heads=0 must be a positive integer"),
    (dict(num_kv_heads=0), "num_kv_heads=0 must be a positive integer"),
    (dict(linear_num_key_heads=0), "linear_num_key_heads=0 must be a positive integer"),
    (dict(hidden_size=None), "hidden_size=None must be a positive integer"),
    (dict(num_experts=-1), "num_experts=-1 must be a non-negative integer"),
    (dict(rope_theta="big"), "rope_theta='big' must be a positive finite number"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings='yes' must be true or false"),
    (dict(layer_types=None), "layer_types=None must be a list"),
    (dict(eos_token_id=-1), "eos_token_id=-1 must be null"),
    (dict(intermediate_size=0), "intermediate_size=0 must be positive for a dense model"),
])
def test_model_config_checks_types_before_arithmetic(change, message):
    with pytest.raises(ValueError) as err:
        tiny_config(**change)
    assert type(err.value) is ValueError and message in str(err.value), str(err.value)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(bogus=1), "unknown config fields ['bogus']"),
    (lambda d: d.pop("hidden_size"), "config is missing required fields ['hidden_size']"),
    (lambda d: d.update(num_heads=None), "num_heads=None must be a positive integer"),
    (lambda d: d.update(layer_types="abc"), "layer_types='abc' must be a list"),
])
def test_from_dict_errors_name_the_field(edit, message):
    d = json.loads(json.dumps(tiny_config().to_dict()))
    edit(d)
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict(d)
    assert type(err.value) is ValueError and message in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="must be a JSON object of fields, got a list"):
        ModelConfig.from_dict([d])


def test_from_dict_round_trip_and_defaults():
    cfg = tiny_config(moe=True, eos_token_id=(1, 2))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    partial = {k: v for k, v in tiny_config().to_dict().items() if k not in ("rope_theta", "conv_kernel")}
    assert ModelConfig.from_dict(partial) == tiny_config()


# Values of the right type that break later (issue 28, items 15 and 17's sweep) --------------------------------
@pytest.mark.parametrize("eos", [10, [3, 10], 10**6])
def test_eos_outside_the_vocabulary_is_refused_when_the_config_is_read(eos):
    """An eos_token_id >= vocab_size used to convert and load; generate then failed blaming the command line."""
    for build in (lambda: ModelConfig.from_hf(_hf(eos_token_id=eos)),
                  lambda: ModelConfig.from_dict(dict(tiny_config().to_dict(), vocab_size=10, eos_token_id=eos))):
        with pytest.raises(ValueError) as err:
            build()
        assert f"eos_token_id={tuple(eos) if isinstance(eos, list) else eos!r}" in str(err.value), str(err.value)
        assert "[0, vocab_size=10)" in str(err.value), str(err.value)
    assert ModelConfig.from_hf(_hf(eos_token_id=[0, 9])).eos_token_id == (0, 9)


def test_a_tp_shard_config_keeps_the_global_eos():
    """A shard's config counts its share of the vocabulary; its eos ids stay global (Qwen3.5: 248046 of 248320)."""
    from pcp_jax.config import PRESETS
    from pcp_jax.parallel.tensor import local_config
    cfg = PRESETS["qwen3.5-9b"]
    assert local_config(cfg, 8).eos_token_id == cfg.eos_token_id >= local_config(cfg, 8).vocab_size
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("hf,message", [
    # bool("false") is True: a quoted flag used to tie the embeddings silently
    (_hf(tie_word_embeddings="false"), "field 'tie_word_embeddings' is 'false'; expected true or false"),
    (_hf(model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
         norm_topk_prob="no"), "field 'norm_topk_prob' is 'no'; expected true or false"),
    # transformers renormalises whatever the flag says; other implementations honour it
    (_hf(model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
         norm_topk_prob=False), "norm_topk_prob=false is not supported"),
    # a kernel longer than a GDN chunk + 1 failed inside the cp>1 compile with a shape error
    (_hf(linear_conv_kernel_dim=66), "conv_kernel=66 is not supported; expected at most 65"),
    (_hf(rope_theta=float("inf")), "rope_theta=inf must be a positive finite number"),
    (_hf(rms_norm_eps=float("nan")), "rms_norm_eps=nan must be a non-negative finite number"),
])
def test_values_that_used_to_break_later_are_refused(hf, message):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf(hf)
    assert type(err.value) is ValueError and message in str(err.value), str(err.value)
    assert len(str(err.value).splitlines()) == 1

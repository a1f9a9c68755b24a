"""RoPE settings are read as transformers reads them, and YaRN runs as transformers runs it (issue 28, item 1):
a `rope_scaling` key used to be ignored silently (relative error 3e-2 against transformers).

- `ModelConfig.from_hf` + `pcp_jax.model.rope_frequencies` against the inverse frequencies and cos/sin scale of
  transformers' own rotary embedding, built from the same config.json through `from_pretrained` (which key wins:
  `rope_scaling` over `rope_parameters`, the dict's `rope_theta` over the top level, a top-level
  `original_max_position_embeddings` over the dict's, `type` as the legacy `rope_type`);
- logits of a YaRN model (legacy `rope_scaling` key, prompts past the pretrained positions) against transformers
  at fp32, loaded straight from the HF folder and through a conversion (the fields round-trip);
- every other rope type is refused in one line naming it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from hf_models import BASE, build, hf_logits, rel_err
from transformers import AutoConfig, Qwen3_5ForCausalLM
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

import pcp_jax
from pcp_jax.config import ModelConfig
from pcp_jax.convert import convert
from pcp_jax.model import rope_frequencies
from tiny import tiny_config

TEXT = dict(BASE, model_type="qwen3_5_text", num_hidden_layers=4, head_dim=64, intermediate_size=48,
            max_position_embeddings=1000)
MOE = dict(TEXT, model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)

READS = {
    "no rope keys": {},
    "top-level theta and factor": dict(rope_theta=5.0, partial_rotary_factor=0.5),
    "released layout (M-RoPE sections)": dict(rope_parameters={
        "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
        "mrope_interleaved": True}),
    "dict theta wins over the top level": dict(rope_parameters={"rope_theta": 7.0}, rope_theta=5.0),
    "rope_scaling replaces rope_parameters": dict(
        rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64},
        rope_parameters={"rope_type": "default", "rope_theta": 7.0}),
    "theta inside rope_scaling": dict(rope_scaling={"rope_theta": 3.0}, rope_theta=5.0),
    "legacy type key": dict(rope_scaling={"type": "yarn", "factor": 2, "rope_theta": 500.0}, rope_theta=7.0),
    "top-level original positions win": dict(
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 300},
        original_max_position_embeddings=50),
    "yarn every option": dict(rope_parameters={
        "rope_type": "yarn", "factor": 3.5, "original_max_position_embeddings": 128, "rope_theta": 1e6,
        "partial_rotary_factor": 1.0, "beta_fast": 16, "beta_slow": 2, "mscale": 1, "mscale_all_dim": 0.5}),
    "yarn without truncation, explicit attention factor": dict(rope_parameters={
        "rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 100, "truncate": False,
        "attention_factor": 1.3}),
    "yarn factor from the positions": dict(rope_parameters={
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 100}),
    "moe yarn": dict(MOE, rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                           "mrope_section": [11, 11, 10], "mrope_interleaved": True}),
}


@pytest.mark.parametrize("case", list(READS))
def test_rope_is_read_as_transformers_reads_it(case, tmp_path):
    hf = dict(TEXT, **READS[case])
    (tmp_path / "config.json").write_text(json.dumps(hf))
    transformers.logging.set_verbosity_error()  # its warnings about a yarn factor that differs from the positions
    theirs = AutoConfig.from_pretrained(tmp_path)
    rotary = (Qwen3_5MoeTextRotaryEmbedding if hf["model_type"].startswith("qwen3_5_moe")
              else Qwen3_5TextRotaryEmbedding)(theirs)
    cfg = ModelConfig.from_hf(hf)
    inv_freq, scale = rope_frequencies(cfg)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(rotary.attention_scaling, rel=1e-12)
    assert cfg.rope_type == theirs.rope_parameters["rope_type"]
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_yarn_serves_factor_times_the_pretrained_positions():
    cfg = ModelConfig.from_hf(dict(TEXT, max_position_embeddings=262144, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}))
    assert cfg.max_position_embeddings == 4 * 262144


@pytest.mark.parametrize("change,message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}),
     "rope_parameters has rope_type 'linear', which is not supported; expected one of ['default', 'yarn']"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling has rope_type 'dynamic'"),
    (dict(rope_scaling={"type": "mrope", "mrope_section": [1, 1, 1]}), "rope_scaling has rope_type 'mrope'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "rope_type 'llama3'"),
    (dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0]}), "rope_type 'longrope'"),
    (dict(rope_parameters={"rope_type": None}), "rope_type None"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "entries per layer type ['full_attention']"),
    (dict(rope_scaling="yarn"), "field 'rope_scaling' is a str; expected a JSON object"),
    (dict(rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 64}),
     "rope_parameters with rope_type 'yarn' needs 'factor'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}),
     "rope_factor=0.5 must be at least 1"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}, max_position_embeddings=None),
     "rope_type 'yarn' needs original_max_position_embeddings"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}),
     "field 'truncate' is 'yes'; expected true or false"),
])
def test_other_rope_settings_are_refused_in_one_line(change, message):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf(dict(TEXT, **change))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_multimodal_config_reads_rope_from_text_config_only():
    text = dict(TEXT, rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64})
    cfg = ModelConfig.from_hf({"model_type": "qwen3_5", "text_config": text})
    assert (cfg.rope_type, cfg.rope_factor) == ("yarn", 2.0)
    with pytest.raises(ValueError, match=r"RoPE fields \['rope_scaling'\] at the top level are not read"):
        ModelConfig.from_hf({"model_type": "qwen3_5", "text_config": TEXT,
                             "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("change,message", [
    (dict(rope_type="linear"), "rope_type 'linear' is not supported"),
    (dict(rope_factor=4.0), "rope_type is 'default' but YaRN fields are set: rope_factor=4.0"),
    (dict(rope_type="yarn", rope_factor=2.0), "rope_original_max_position_embeddings=0: rope_type 'yarn' needs"),
    (dict(rope_type="yarn", rope_original_max_position_embeddings=64, rope_beta_fast=0.0),
     "rope_beta_fast=0.0 must be a positive finite number"),
])
def test_model_config_checks_its_rope_fields(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**change)


def test_presets_keep_plain_rope():
    for name, cfg in pcp_jax.PRESETS.items():
        inv_freq, scale = rope_frequencies(cfg)
        exponents = np.arange(0, cfg.rotary_dim, 2, dtype=np.float32) / cfg.rotary_dim
        assert cfg.rope_type == "default" and scale == 1.0, name
        np.testing.assert_array_equal(inv_freq, 1.0 / (cfg.rope_theta ** exponents))


def test_yarn_logits_match_transformers(tmp_path):
    """The issue's case: the legacy `rope_scaling` key with YaRN (and a rope_theta inside it), prompts up to 3x the
    pretrained 64 positions. transformers reads the same config.json (its oracle model is reloaded from it)."""
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "converted"
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500.0}
    build(seed=11, head_dim=32, rope_parameters=dict(rope, partial_rotary_factor=0.5)).save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_scaling=rope, partial_rotary_factor=0.5, max_position_embeddings=256)
    (hf_dir / "config.json").write_text(json.dumps(config))
    oracle = Qwen3_5ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert oracle.model.rotary_emb.rope_type == "yarn" and oracle.model.rotary_emb.attention_scaling > 1
    convert(hf_dir, out_dir, dtype="float32", progress=False)
    ids = np.random.default_rng(5).integers(0, config["vocab_size"], (2, 190))
    ref = hf_logits(oracle, ids)
    for path in (hf_dir, out_dir):
        model = pcp_jax.load_model(path, dtype="float32")
        assert model.cfg.rope_type == "yarn"
        assert rel_err(model.logits(ids), ref) <= 1e-5, path

"""The model against transformers' Qwen3.5 (the oracle), fp32 on CPU: logits and greedy generation,
loaded straight from an HF folder and through convert -> Orbax -> load."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pcp_jax
from pcp_jax.convert import convert
from hf_models import build, hf_generate, hf_logits, rel_err

TOL = 1e-5
VARIANTS = {
    # qk/v head ratio 2, partial rotary 0.25, untied, layer pattern [lin, lin, lin, full]
    "dense": dict(moe=False),
    # ratio 1, bigger heads, rotary 0.5, tied embeddings, attention first
    "dense_tied": dict(moe=False, linear_num_value_heads=2, head_dim=32, linear_key_head_dim=16,
                       linear_value_head_dim=16, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
                       layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"]),
    "moe": dict(moe=True, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
    "moe_tied": dict(moe=True, tie_word_embeddings=True, linear_num_value_heads=2, num_attention_heads=8,
                     num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                             "partial_rotary_factor": 1.0}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_dir(request, tmp_path_factory):
    model = build(seed=hash(request.param) % 1000, **VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, str(path)


def test_logits_match_transformers_direct_and_converted(hf_dir, tmp_path):
    hf, path = hf_dir
    rng = np.random.default_rng(1)
    out_dir = tmp_path / "orbax"
    convert(path, out_dir, dtype="float32", progress=False)
    direct = pcp_jax.load_model(path, dtype="float32")
    converted = pcp_jax.load_model(out_dir, dtype="float32")
    for n in (1, 70, 131):
        ids = rng.integers(0, hf.config.vocab_size, (2, n))
        ref = hf_logits(hf, ids)
        assert rel_err(direct.logits(ids), ref) <= TOL, n
        assert rel_err(converted.logits(ids), ref) <= TOL, n


def test_greedy_generate_matches_transformers(hf_dir):
    hf, path = hf_dir
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, (2, 37))
    ours = pcp_jax.load_model(path, dtype="float32").generate(ids, 16)
    np.testing.assert_array_equal(ours, hf_generate(hf, ids, 16))


def _to_multimodal_sharded(src: str, dst: str, shards: int = 3) -> None:
    """Rewrite an HF text checkpoint as a multimodal one (`model.language_model.` prefix, a vision tensor
    and an MTP tensor to skip) split over several safetensors files with an index."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    renamed = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    renamed["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(4, 4)
    renamed["mtp.fc.weight"] = torch.zeros(4, 4)
    names = sorted(renamed)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: renamed[k].contiguous() for k in part}, os.path.join(dst, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f:
        text_cfg = json.load(f)
    text_type = text_cfg["model_type"]
    outer = {"model_type": text_type.replace("_text", ""), "text_config": text_cfg,
             "tie_word_embeddings": text_cfg.get("tie_word_embeddings", False)}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(outer, f)


@pytest.mark.parametrize("moe", [False, True])
def test_multimodal_sharded_layout(moe, tmp_path):
    hf = build(moe=moe, seed=5)
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf.save_pretrained(src)
    dst.mkdir()
    _to_multimodal_sharded(str(src), str(dst))
    ids = np.random.default_rng(3).integers(0, hf.config.vocab_size, (1, 45))
    got = pcp_jax.load_model(dst, dtype="float32").logits(ids)
    assert rel_err(got, hf_logits(hf, ids)) <= TOL


def test_bf16_close_to_fp32(tmp_path):
    hf = build(moe=True, seed=7)
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, (1, 100))
    got = pcp_jax.load_model(tmp_path, dtype="bfloat16").logits(ids)
    assert got.dtype == np.float32
    assert rel_err(got, hf_logits(hf, ids)) <= 5e-2

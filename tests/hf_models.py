"""Tiny transformers Qwen3.5 models with random weights: the numerical oracle of the tests."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

BASE = dict(vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, rms_norm_eps=1e-6)


def build(moe: bool = False, seed: int = 0, **overrides):
    """A tiny HF model in eval mode with every weight random, including the norms, A_log and dt_bias
    that transformers initialises to constants (so that a mapping mistake cannot hide)."""
    torch.manual_seed(seed)
    kw = dict(BASE, **overrides)
    if moe:
        kw.setdefault("num_experts", 8)
        kw.setdefault("num_experts_per_tok", 2)
        kw.setdefault("moe_intermediate_size", 16)
        kw.setdefault("shared_expert_intermediate_size", 24)
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**kw))
    else:
        kw.setdefault("intermediate_size", 48)
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "A_log" in name or "dt_bias" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def hf_generate(model, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(np.asarray(ids, np.int64)), max_new_tokens=new_tokens,
                             do_sample=False, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out.numpy()


def hf_greedy(model, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy continuation by the full forward pass (the argmax of `hf_logits` at the last position, token
    after token). For some tiny random MoE configs transformers' `generate` (its cached decode path) picks a
    different token than its own forward pass does, by a margin far above fp32 noise (seed 12 of
    tests/test_tp.py: 0.018 between the top two logits at the fourth step); the forward pass is the oracle."""
    out = np.asarray(ids, np.int64)
    for _ in range(new_tokens):
        out = np.concatenate([out, hf_logits(model, out)[:, -1].argmax(-1)[:, None]], axis=1)
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# FP8 checkpoints in the released layout ---------------------------------------------------------------------
# Dimensions of a tiny model whose every matrix an FP8 release quantizes has both dims a multiple of 128
# (transformers' dequantizer needs it): hidden 128; q_proj 512 x 128, k/v 128 x 128, o_proj 128 x 256; GDN
# in_proj_qkv 384 x 128, in_proj_z 128 x 128, out_proj 128 x 128; MLP / experts / shared expert 128 wide.
FP8_DIMS = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_key_head_dim=64,
                linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# The Linear weights an FP8 release converts (unless modules_to_not_convert lists them); lm_head too, here.
_CONVERTED = re.compile(r"(\.self_attn\.[qkvo]_proj|\.linear_attn\.(in_proj_qkv|in_proj_z|out_proj)|"
                        r"\.mlp\.(experts\.\d+\.|shared_expert\.)?(gate|up|down)_proj|^lm_head)\.weight$")


def quantize_e4m3(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float32 (both multiples of 128) -> (F8_E4M3 weight, F32 weight_scale_inv [out/128, in/128]) as
    transformers' FineGrainedFP8 quantizer makes them: per block scale_inv = amax / 448, values clipped."""
    rows, cols = w.shape
    blocks = w.reshape(rows // 128, 128, cols // 128, 128)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-30).astype(np.float32) / np.float32(448)
    values = np.clip(blocks / scale[:, None, :, None], -448, 448).reshape(rows, cols)
    return torch.from_numpy(values.astype(np.float32)).to(torch.float8_e4m3fn), torch.from_numpy(scale)


def save_fp8(model, folder, not_convert: list[str]) -> str:
    """`model` saved as a released FP8 checkpoint: every Linear weight of _CONVERTED whose module no pattern of
    `not_convert` names (a suffix, or a prefix up to a dot) as F8_E4M3 with its weight_scale_inv; config.json's
    quantization_config as the releases write it."""
    model.save_pretrained(folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = {}
    for name, t in load_file(path).items():
        module = name.rsplit(".", 1)[0]
        kept = any(module.endswith(p) or re.match(rf"{re.escape(p)}(\.|$)", module) for p in not_convert)
        if _CONVERTED.search(name) and not kept:
            tensors[name], tensors[name + "_scale_inv"] = quantize_e4m3(t.float().numpy())
        else:
            tensors[name] = t
    save_file(tensors, path)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = dict(FP8_CONFIG, modules_to_not_convert=not_convert)
    with open(config_path, "w") as f:
        json.dump(config, f)
    return str(folder)


def load_fp8_dequantized(folder, moe: bool):
    """transformers' own reading of an FP8 folder, dequantized in float32 (FineGrainedFP8Config(dequantize=True))."""
    from transformers import FineGrainedFP8Config
    cls = Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM
    return cls.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True),
                               dtype=torch.float32).eval()

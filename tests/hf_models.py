"""Tiny transformers Qwen3.5 models with random weights: the numerical oracle of the tests."""

from __future__ import annotations

import numpy as np
import torch
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

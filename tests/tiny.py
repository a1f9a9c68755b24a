"""Tiny random configurations for tests that need no transformers oracle (cp=1 is their reference), and the
greedy decode trace those tests compare."""

import numpy as np

from pcp_jax.config import ModelConfig
from pcp_jax.engine import to_host
from pcp_jax.weights import random_params

LAYERS = ("linear_attention", "full_attention", "linear_attention", "full_attention")


def tiny_config(moe: bool = False, **kw) -> ModelConfig:
    base = dict(vocab_size=67, hidden_size=32, num_layers=4, layer_types=LAYERS, num_heads=4, num_kv_heads=2,
                head_dim=16, intermediate_size=48, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=8)
    if moe:
        base.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24)
    base.update(kw)
    return ModelConfig(**base)


def tiny_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random fp32 weights, norms included (random_params sets norms to identity)."""
    params = {k: np.asarray(v) for k, v in random_params(cfg, seed, np.float32).items()}
    rng = np.random.default_rng(seed)
    for k, v in params.items():
        if v.ndim == 1:
            params[k] = (v + rng.normal(0, 0.2, v.shape)).astype(np.float32)
    return params


def decode_trace(model, ids, steps, chunk_size=None):
    """Greedy tokens [B, steps] and the logits of every step [B, steps, V] (prefill's, then each decode step's)."""
    state = model.prefill(ids, max_new_tokens=steps, chunk_size=chunk_size)
    logits, toks = [to_host(state.logits)], []
    for step in range(steps):
        tok = logits[-1].argmax(-1).astype(np.int32)
        toks.append(tok)
        if step + 1 < steps:
            logits.append(to_host(model.decode_step(state, tok, step)))
    return np.stack(toks, 1), np.stack(logits, 1)

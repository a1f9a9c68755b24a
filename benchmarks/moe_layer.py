"""The whole MoE layer on one GPU as the model runs it (pcp_jax.model.MoE with kernels="gpu": router, dispatch,
our grouped matmuls, combine, shared expert) against transformers' `Qwen3_5MoeSparseMoeBlock` with
`experts_implementation="grouped_mm"`, bf16, the same random weights.

    python benchmarks/moe_layer.py [--cases qwen3.5-397b-a17b:8192,...]

Weights: layer 0's MoE tensors of the preset, drawn by their declared initializers (pcp_jax.weights); T random
bf16 tokens. Checked first: transformers' output against ours on the tokens both route to the same top-k set
(rel. L2 <= 2e-2: both bf16, rounded differently; at least 80% of the tokens routed alike). Timed: ours by
benchmarks/timing.py's bursts, transformers by triton's do_bench median. FLOPs: router 2·T·D·E + experts
2·T·k·3·D·I + shared expert 2·T·(3·D·Is + D); % of the bf16 peak in benchmarks/peaks.py. Exit 1 if a check
fails.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (transformers) shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from peaks import BF16_TFLOPS  # noqa: E402
from pcp_jax.config import ModelConfig, preset  # noqa: E402
from pcp_jax.model import MoE  # noqa: E402
from pcp_jax.parallel.context import ShardContext  # noqa: E402
from pcp_jax.weights import declare, sample  # noqa: E402
from timing import bench, check, header, torch_ms  # noqa: E402

CASES = [("qwen3.5-397b-a17b", 8192), ("qwen3.5-397b-a17b", 32768), ("qwen3.5-122b-a10b", 8192),
         ("qwen3.5-122b-a10b", 32768), ("qwen3.5-35b-a3b", 8192), ("qwen3.5-35b-a3b", 32768)]


def layer_params(cfg: ModelConfig) -> dict:
    """Layer 0's MoE tensors as {"moe.<leaf>": bf16 array}."""
    prefix = "layers.0."
    weights = {name[len(prefix):]: w for name, w in declare(cfg).items() if name.startswith(prefix + "moe.")}
    keys = jax.random.split(jax.random.PRNGKey(0), len(weights))
    return {name: sample(w.init, key, w.shape, jnp.bfloat16) for key, (name, w) in zip(keys, weights.items())}


def transformers_block(cfg: ModelConfig, params: dict):
    """transformers' qwen3_5_moe sparse MoE block on the GPU, grouped_mm experts, bf16, holding `params`."""
    import torch
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    hf = Qwen3_5MoeTextConfig(hidden_size=cfg.hidden_size, num_experts=cfg.num_experts,
                              num_experts_per_tok=cfg.num_experts_per_tok,
                              moe_intermediate_size=cfg.moe_intermediate_size,
                              shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                              experts_implementation="grouped_mm")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            block = Qwen3_5MoeSparseMoeBlock(hf)
    finally:
        torch.set_default_dtype(default)
    block = block.to_empty(device="cuda").eval()
    # ours are input-major [..., in, out]; torch's Linear weights are [..., out, in]
    t = lambda name: torch.from_dlpack(params[f"moe.{name}"]).transpose(-1, -2).contiguous()
    with torch.no_grad():
        block.gate.weight.copy_(t("router"))
        block.experts.gate_up_proj.copy_(torch.cat([t("gate_proj"), t("up_proj")], dim=1))
        block.experts.down_proj.copy_(t("down_proj"))
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.shared_expert, n).weight.copy_(t(f"shared.{n}"))
        block.shared_expert_gate.weight.copy_(t("shared_gate"))
    return block


def run_case(name: str, tokens: int) -> tuple[bool, tuple]:
    import torch

    cfg = preset(name)
    params = layer_params(cfg)
    graphdef, state = nnx.split(MoE(cfg, params, "moe", jnp.bfloat16))
    ctx = ShardContext("cp", 1, "sequence", "gpu", 0, jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    ours = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, ctx))
    experts = jax.jit(lambda st, x: nnx.merge(graphdef, st).route(x)[1])
    x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, cfg.hidden_size), jnp.bfloat16)
    y, top = np.asarray(ours(state, x), np.float32), np.asarray(experts(state, x))
    block, xt = transformers_block(cfg, params), torch.from_dlpack(x).reshape(1, tokens, -1)
    with torch.inference_mode():
        yt = block(xt).float().reshape(tokens, -1).cpu().numpy()
        hf_top = block.gate(xt.reshape(tokens, -1))[2].cpu().numpy()
        hf_ms = torch_ms(lambda: block(xt))
    same = np.all(np.sort(hf_top, -1) == np.sort(top, -1), axis=-1)  # near ties may route differently
    err = float(np.linalg.norm(yt[same] - y[same]) / np.linalg.norm(y[same]))
    ok = check(f"{name} T={tokens}: transformers vs ours on the {same.mean():.1%} of tokens routed alike", err,
               2e-2) and same.mean() >= 0.8
    D, E, k, I, Is = (cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                      cfg.shared_expert_intermediate_size)
    flops = 2.0 * tokens * (D * E + k * 3 * D * I + (3 * D * Is + D if Is else 0))
    del block
    torch.cuda.empty_cache()
    return ok, (name, tokens, bench(ours, state, x, reps=5, target_s=0.03), hf_ms, flops)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(f"{n}:{t}" for n, t in CASES), help="preset:tokens,...")
    args = p.parse_args()
    print(header(), flush=True)
    ok, rows = True, []
    for case in args.cases.split(","):
        name, tokens = case.split(":")
        case_ok, row = run_case(name, int(tokens))
        ok &= case_ok
        rows.append(row)
    print(f"\n| preset | tokens | ours ms | % of {BF16_TFLOPS:.0f} | transformers grouped_mm ms | ours faster |")
    print("|---|---|---|---|---|---|")
    for name, tokens, ms, hf_ms, flops in rows:
        print(f"| {name} | {tokens} | {ms:.2f} | {100 * flops / ms / 1e9 / BF16_TFLOPS:.1f} | {hf_ms:.2f} | "
              f"{hf_ms / ms:.2f}x |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

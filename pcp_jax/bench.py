"""`pcp-jax bench`: end-to-end prefill benchmark of a named preset with random weights (one process, one mesh).

  pcp-jax bench --preset qwen3.5-9b --tokens 8192,32768,131072 [--cp 1] [--check]
  (or python scripts/bench_prefill.py with the same flags)
  pcp-jax bench --impl hf --preset qwen3.5-9b --tokens 8192,32768   (transformers + FLA)

Time to first token = one `Model.prefill` (all layers, KV cache written, next-token logits), median of
`--reps` after a warm-up call that compiles. Model FLOPs count every matmul of the layers (the lm_head
only for the last token), causal attention as half the square, and the chunked GDN's matmuls
(per 64-token chunk and value head: the WY system, w/u, state reads/updates and the intra-chunk
output). MFU = achieved FLOP/s over the measured bf16 matmul peak of the machine (`--peak`, TFLOP/s).
`--check` first compares the GPU-kernel path with the plain-jnp path on the demo preset (bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def model_flops(cfg, n: int) -> float:
    D = cfg.hidden_size
    mm = 0.0
    for t in cfg.layer_types:
        if t == "full_attention":
            hd = cfg.head_dim
            mm += D * (cfg.num_heads * 2 * hd + 2 * cfg.num_kv_heads * hd) + cfg.num_heads * hd * D
        else:
            mm += D * (cfg.conv_dim + cfg.linear_value_dim + 2 * cfg.linear_num_value_heads) + cfg.linear_value_dim * D
        if cfg.is_moe:
            mm += D * cfg.num_experts + cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size
            mm += 3 * D * cfg.shared_expert_intermediate_size
        else:
            mm += 3 * D * cfg.intermediate_size
    flops = 2.0 * n * mm + 2.0 * D * cfg.vocab_size
    attn_layers = len(cfg.attention_layers)
    flops += attn_layers * 2 * 2 * cfg.num_heads * cfg.head_dim * n * n / 2
    L, H, dk, dv = 64, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    per_chunk = 2 * L * L * dk + 2 * L * L * (dk + dv) + 2 * 2 * L * dk * dv + 2 * L * dk * dv + 2 * L * L * dk + 2 * L * L * dv
    flops += len(cfg.gdn_layers) * H * (n / L) * per_chunk
    return flops


def bench_ours(args, cfg, lengths):
    import jax
    from pcp_jax.engine import Model
    from pcp_jax.model import random_params

    t0 = time.perf_counter()
    params = random_params(cfg, seed=0, dtype=jax.numpy.bfloat16)
    model = Model(cfg, params, cp=args.cp, dtype="bfloat16", kernels=args.kernels, gdn_strategy=args.gdn_strategy)
    del params
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for n in lengths:
        ids = np.random.default_rng(n).integers(0, cfg.vocab_size, (args.batch, n))
        t0 = time.perf_counter()
        model.prefill(ids).logits.block_until_ready()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model.prefill(ids).logits.block_until_ready()
            times.append(time.perf_counter() - t0)
        rows.append((n, statistics.median(times), compile_s))
        print(f"{n} tokens: first call {compile_s:.1f} s, median {rows[-1][1] * 1e3:.1f} ms", flush=True)
    return rows


def bench_hf(args, cfg, lengths):
    import torch
    import transformers
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    hf_cfg = Qwen3_5TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads, linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim, layer_types=list(cfg.layer_types))
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = Qwen3_5ForCausalLM(hf_cfg).eval()
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, attn {model.config._attn_implementation}")
    rows = []
    for n in lengths:
        ids = torch.randint(0, cfg.vocab_size, (args.batch, n), device="cuda")
        with torch.no_grad():
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(args.reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(ids, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        rows.append((n, statistics.median(times), compile_s))
        print(f"{n} tokens: first call {compile_s:.1f} s, median {rows[-1][1] * 1e3:.1f} ms", flush=True)
    return rows


def check_gpu_path():
    """Demo preset: bf16 with the GPU kernels and bf16 with the jnp references, both against an fp32 jnp
    run of the same (bf16-rounded) weights. The GPU path passes if its error is within 1e-2 or within
    1.5x the jnp path's own bf16 error (both paths round different intermediates)."""
    import jax
    from pcp_jax.config import PRESETS
    from pcp_jax.engine import Model
    from pcp_jax.model import random_params

    cfg = PRESETS["demo"]
    params = {k: np.asarray(v) for k, v in random_params(cfg, seed=1, dtype=jax.numpy.bfloat16).items()}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 3000))
    with jax.default_matmul_precision("highest"):  # fp32 matmuls on GPUs default to TF32
        ref = Model(cfg, {k: v.astype(np.float32) for k, v in params.items()}, dtype="float32",
                    kernels="jnp").logits(ids)
    rel = lambda x: float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
    err_jnp = rel(Model(cfg, params, dtype="bfloat16", kernels="jnp").logits(ids))
    err_gpu = rel(Model(cfg, params, dtype="bfloat16", kernels="gpu").logits(ids))
    ok = err_gpu <= max(1e-2, 1.5 * err_jnp)
    print(f"check: demo preset, rel. error of bf16 logits vs fp32: kernels=gpu {err_gpu:.2e}, "
          f"kernels=jnp {err_jnp:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pcp-jax bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.5-9b")
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--impl", choices=["ours", "hf"], default="ours")
    parser.add_argument("--kernels", default="auto", choices=["auto", "jnp", "gpu"])
    parser.add_argument("--gdn-strategy", default="auto", choices=["auto", "batch", "sequence"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak", type=float, default=799.0, help="measured bf16 matmul TFLOP/s")
    parser.add_argument("--check", action="store_true", help="run the GPU-vs-fp32 check first")
    parser.add_argument("--check-only", action="store_true", help="run the check and stop")
    parser.add_argument("--layers", type=int, help="keep only the first N layers of the preset (N a multiple "
                        "of its attention period), e.g. to time a slice of a model whose compile is slow")
    args = parser.parse_args(argv)
    from pcp_jax.config import preset
    cfg = preset(args.preset)
    if args.layers:
        import dataclasses
        cfg = dataclasses.replace(cfg, num_layers=args.layers, layer_types=cfg.layer_types[: args.layers])
    lengths = [int(t) for t in args.tokens.split(",")]
    if args.check or args.check_only:
        ok = check_gpu_path()
        if args.check_only or not ok:
            return 0 if ok else 1
    rows = (bench_hf if args.impl == "hf" else bench_ours)(args, cfg, lengths)
    layers = f" (first {args.layers} layers)" if args.layers else ""
    print(f"\n{args.impl} prefill, preset {args.preset}{layers}, batch {args.batch}, cp {args.cp}, bf16")
    print("| tokens | time (ms) | tokens/s | model TFLOP/s | MFU | first call (s) |")
    print("|---|---|---|---|---|---|")
    for n, t, c in rows:
        tf = model_flops(cfg, n) * args.batch / t / 1e12
        print(f"| {n} | {t * 1e3:.1f} | {args.batch * n / t:,.0f} | {tf:.0f} | {tf / args.peak:.1%} | {c:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

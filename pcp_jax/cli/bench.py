"""`pcp-jax bench`: end-to-end prefill benchmark of a named preset with random weights (one process, one mesh).

  pcp-jax bench --preset qwen3.5-9b --tokens 8192,32768,131072 [--cp 1] [--tp 1] [--check] [--weights fp8]
  (or python scripts/bench_prefill.py with the same flags)
  pcp-jax bench --impl hf --preset qwen3.5-9b --tokens 8192,32768   (transformers + FLA)

Time to first token = one `Model.prefill` (all layers, KV cache written, next-token logits), median of
`--reps` after a warm-up call that compiles. Model FLOPs count every matmul of the layers (the lm_head
only for the last token), causal attention as half the square, and the chunked GDN's matmuls
(per 64-token chunk and value head: the WY system, w/u, state reads/updates and the intra-chunk
output). MFU = achieved FLOP/s over the measured bf16 matmul peak (`--peak`, TFLOP/s, one GPU) times the
cp·tp GPUs used.
`--check` first compares the GPU-kernel path with the plain-jnp path on the demo preset (bf16).
`--weights fp8` (or fp8-w8a8): the matrices an FP8 release stores in FP8 are random values quantized to e4m3 with
128x128 block scales on the devices (weights.RandomSource(fp8=True)) and kept in FP8 (pcp_jax.fp8), so the big
presets' FP8 speed can be measured without a checkpoint; bf16 (default) is the unquantized model.
`--decode N` times N decode steps after each prefill (the prefill then reserves room for them), each
`decode_step` call waited for alone ("decode step"), then N greedy tokens through `generate`'s loop, which
queues each step before it reads the sampled token ("generate": ms per token, what a user of `generate` sees);
`--profile DIR` traces one more prefill at the longest length and prints how much NCCL kernel time overlapped compute
(pcp_jax/overlap.py). A length that fails (e.g. out of memory) is reported in the table and the run goes
on; at the end one error line names it and the exit status is 1. Bad flags exit 2 before any work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from pcp_jax.cli.args import finite_float, int_at_least, positive_int_list, use_compile_cache
from pcp_jax.cli.errors import Parser, RunError, UsageError, run_guarded, wants_debug


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


def _peak_gib(devices) -> float | None:
    """Largest peak allocation over `devices` so far in this process (None where the backend has no stats)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return max(peaks) / 2**30 if peaks and None not in peaks else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def first_and_median(call, reps: int):
    """Time `call()` (which must finish its device work before returning) once, then `reps` more times.
    Returns (first-call seconds, median seconds, the last result). The previous result is dropped before
    each call, so two results (e.g. two KV caches) never live at once."""
    t0 = time.perf_counter()
    result = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        result = None
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), result


def _prompt_and_room(args, cfg, n):
    """The benchmark's prompt of n tokens ([batch, n], fixed seed) and the decode room its prefill reserves."""
    ids = np.random.default_rng(n).integers(0, cfg.vocab_size, (args.batch, n))
    return ids, (args.decode + 1 if args.decode else 0)


def bench_ours(args, cfg, lengths):
    from pcp_jax.engine import Model
    from pcp_jax.weights import RandomSource

    t0 = time.perf_counter()
    fp8 = args.weights != "bf16"
    try:  # random weights made on the devices, already split over tp (no host copy of the model)
        model = Model(cfg, RandomSource(cfg, seed=0, fp8=fp8), cp=args.cp, tp=args.tp, dtype="bfloat16",
                      kernels=args.kernels, gdn_strategy=args.gdn_strategy, weights=args.weights if fp8 else "auto",
                      compile_cache_dir=args.cache_dir or "off")
    except ValueError as e:  # --cp x --tp beyond the visible devices, a split or strategy the shape cannot take
        raise UsageError(str(e)) from None
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    devices = list(model.mesh.devices.flat)
    rows = []
    for n in lengths:
        try:
            rows.append(_time_one_length(args, cfg, model, devices, n))
        except Exception as e:  # e.g. out of memory at the longest prompt: report it, go on
            print(f"{n} tokens: failed: {_first_line(e)}", flush=True)
            rows.append({"n": n, "error": _first_line(e)})
            continue
        if args.profile and n == max(lengths):  # right away: a time limit may stop the run later
            _profile_prefill(args, cfg, model, n)
    return rows


def _time_one_length(args, cfg, model, devices, n):
    """Prefill time (median of reps after a compiling call) at n tokens, then decode step times."""
    ids, new = _prompt_and_room(args, cfg, n)

    def prefill():
        state = model.prefill(ids, max_new_tokens=new)
        state.logits.block_until_ready()
        return state

    compile_s, median, state = first_and_median(prefill, args.reps)
    row = {"n": n, "time": median, "compile": compile_s}
    msg = f"{n} tokens: first call {compile_s:.1f} s, median {row['time'] * 1e3:.1f} ms"
    if args.decode:
        tok = np.asarray(ids[:, -1], np.int32)
        model.decode_step(state, tok, 0).block_until_ready()  # compiles the step
        steps = []
        for step in range(1, args.decode + 1):
            t0 = time.perf_counter()
            model.decode_step(state, tok, step).block_until_ready()
            steps.append(time.perf_counter() - t0)
        row["decode"] = statistics.median(steps)
        model.decode(state, 2)  # compiles the sampling program
        t0 = time.perf_counter()
        model.decode(state, args.decode + 1)  # rewrites the same slots: the room is there
        row["per_token"] = (time.perf_counter() - t0) / args.decode
        msg += (f", decode step median {row['decode'] * 1e3:.2f} ms over {args.decode}, generate "
                f"{row['per_token'] * 1e3:.2f} ms per token")
    row["peak_gib"] = _peak_gib(devices)
    if row["peak_gib"] is not None:
        msg += f", peak memory so far {row['peak_gib']:.1f} GiB"
    print(msg, flush=True)
    return row


def _profile_prefill(args, cfg, model, n):
    """One traced prefill at n tokens (already compiled); prints the NCCL/compute overlap per GPU."""
    import jax
    from pcp_jax.overlap import report
    ids, new = _prompt_and_room(args, cfg, n)
    jax.profiler.start_trace(args.profile)
    model.prefill(ids, max_new_tokens=new).logits.block_until_ready()
    jax.profiler.stop_trace()
    print(f"\nprofile of one {n}-token prefill (trace under {args.profile}):\n{report(args.profile)}", flush=True)


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
    gdn = next(m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    modeling = sys.modules[type(gdn).__module__]
    for name in ("chunk_gated_delta_rule", "causal_conv1d_fn", "is_fast_path_available"):
        fn = getattr(gdn, name, None) or getattr(modeling, name, None)  # which GDN kernels HF runs
        print(f"  {name}: {getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)}")
    rows = []
    for i, n in enumerate(lengths):
        try:
            rows.append(_time_hf_length(args, cfg, model, n))
            if i == 0:  # which GDN kernels transformers actually ran
                fla = sorted(m for m in sys.modules if m.startswith("fla.ops"))
                print(f"  flash-linear-attention modules loaded: {fla[:6] if fla else 'none (torch fallback)'}")
        except Exception as e:  # e.g. out of memory: report it, go on
            print(f"{n} tokens: failed: {_first_line(e)}", flush=True)
            rows.append({"n": n, "error": _first_line(e)})
            torch.cuda.empty_cache()
    return rows


def _time_hf_length(args, cfg, model, n):
    import torch
    ids = torch.randint(0, cfg.vocab_size, (args.batch, n), device="cuda")

    @torch.no_grad()
    def forward():
        model(ids, logits_to_keep=1)
        torch.cuda.synchronize()

    torch.cuda.synchronize()
    compile_s, median, _ = first_and_median(forward, args.reps)
    row = {"n": n, "time": median, "compile": compile_s,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(f"{n} tokens: first call {compile_s:.1f} s, median {row['time'] * 1e3:.1f} ms", flush=True)
    return row


def demo_bf16_reference(tokens: int, batch: int):
    """The demo preset with random weights rounded to bf16, a random prompt [batch, tokens], and `rel(logits)`:
    the relative L2 error of full-sequence logits against an fp32 run of the same weights (exact-fp32
    matmuls). Shared by the GPU check below and scripts/check_bf16_drift.py."""
    import jax
    from pcp_jax.config import PRESETS
    from pcp_jax.engine import Model
    from pcp_jax.weights import random_params

    cfg = PRESETS["demo"]
    params = {k: np.asarray(v) for k, v in random_params(cfg, seed=1, dtype=jax.numpy.bfloat16).items()}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, tokens))
    with jax.default_matmul_precision("highest"):  # fp32 matmuls on GPUs default to TF32
        ref = Model(cfg, {k: v.astype(np.float32) for k, v in params.items()}, dtype="float32",
                    kernels="jnp").logits(ids)
    rel = lambda x: float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
    return cfg, params, ids, rel


def check_gpu_path():
    """Demo preset: bf16 with the GPU kernels and bf16 with the jnp references, both against an fp32 jnp
    run of the same (bf16-rounded) weights. The GPU path passes if its error is within 1e-2 or within
    1.5x the jnp path's own bf16 error (both paths round different intermediates)."""
    from pcp_jax.engine import Model

    cfg, params, ids, rel = demo_bf16_reference(3000, 2)
    err_jnp = rel(Model(cfg, params, dtype="bfloat16", kernels="jnp").logits(ids))
    err_gpu = rel(Model(cfg, params, dtype="bfloat16", kernels="gpu").logits(ids))
    ok = err_gpu <= max(1e-2, 1.5 * err_jnp)
    print(f"check: demo preset, rel. error of bf16 logits vs fp32: kernels=gpu {err_gpu:.2e}, "
          f"kernels=jnp {err_jnp:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def build_parser():
    parser = Parser(prog="pcp-jax bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_parser(sub) -> None:
    """`pcp-jax bench` in the command line's parser (pcp_jax.cli)."""
    p = sub.add_parser("bench", help="prefill benchmark of a named preset with random weights", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run)


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="qwen3.5-9b")
    parser.add_argument("--tokens", type=positive_int_list, default=[8192, 32768], help="comma-separated prompt lengths")
    parser.add_argument("--batch", type=int_at_least(1), default=1)
    parser.add_argument("--cp", type=int_at_least(1), default=1)
    parser.add_argument("--tp", type=int_at_least(1), default=1, help="tensor/expert-parallel ranks per cp rank")
    parser.add_argument("--impl", choices=["ours", "hf"], default="ours")
    parser.add_argument("--kernels", default="auto", choices=["auto", "jnp", "gpu"])
    parser.add_argument("--weights", default="bf16", choices=["bf16", "fp8", "fp8-w8a8"],
                        help="random bf16 weights, or FP8 ones (weight-only FP8 matmuls, or w8a8; ours only)")
    parser.add_argument("--gdn-strategy", default="auto", choices=["auto", "batch", "sequence"])
    parser.add_argument("--reps", type=int_at_least(1), default=3)
    parser.add_argument("--peak", type=finite_float(0.0, low_open=True), default=799.0,
                        help="measured bf16 matmul TFLOP/s")
    parser.add_argument("--check", action="store_true", help="run the GPU-vs-fp32 check first")
    parser.add_argument("--check-only", action="store_true", help="run the check and stop")
    parser.add_argument("--decode", type=int_at_least(0), default=0, metavar="N",
                        help="after each prefill, time N decode steps (median per step; ours only)")
    parser.add_argument("--profile", metavar="DIR", help="trace one prefill at the longest length that ran and "
                        "print how much NCCL time overlapped compute (ours only)")
    parser.add_argument("--compile-cache", metavar="DIR", help="compile-cache folder (executables kept between runs), or 'off'")
    parser.add_argument("--layers", type=int_at_least(1), help="keep only the first N layers of the preset (N a "
                        "multiple of its attention period), e.g. to time a slice of a model whose compile is slow")


def bench_shape(name: str, layers: int | None):
    """The preset's ModelConfig, cut to its first `layers` layers; a bad name or cut is a UsageError."""
    import dataclasses
    from pcp_jax.config import preset
    try:
        cfg = preset(name)
    except ValueError as e:
        raise UsageError(f"--preset: {e}") from None
    if layers is None:
        return cfg
    if layers > cfg.num_layers:
        raise UsageError(f"--layers={layers} exceeds the {cfg.num_layers} layers of preset {name!r}")
    try:
        return dataclasses.replace(cfg, num_layers=layers, layer_types=cfg.layer_types[:layers])
    except ValueError as e:
        raise UsageError(f"--layers={layers}: {e}") from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: run(build_parser().parse_args(argv)), debug=wants_debug(argv))


def run(args) -> int:
    """`pcp-jax bench` without the error path (pcp_jax.cli.main and main above provide it)."""
    cfg = bench_shape(args.preset, args.layers)
    if args.impl == "hf" and args.weights != "bf16":
        raise UsageError(f"--weights {args.weights} measures our FP8 path; --impl hf runs bf16 only")
    args.cache_dir = use_compile_cache(args.compile_cache)
    lengths = args.tokens
    if args.check or args.check_only:
        if not check_gpu_path():
            raise RunError("--check: the GPU-kernel path is further from fp32 than allowed (numbers above)")
        if args.check_only:
            return 0
    rows = (bench_hf if args.impl == "hf" else bench_ours)(args, cfg, lengths)
    layers = f" (first {args.layers} layers)" if args.layers else ""
    weights = f", {args.weights} weights" if args.weights != "bf16" else ""
    print(f"\n{args.impl} prefill, preset {args.preset}{layers}, batch {args.batch}, cp {args.cp}, tp {args.tp}, bf16"
          f"{weights}")
    print("| tokens | time (ms) | tokens/s | model TFLOP/s | MFU | first call (s) | decode step (ms) | "
          "generate (ms/token) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["n"]
        if "error" in r:
            print(f"| {n} | {r['error']} | | | | | | | |")
            continue
        t = r["time"]
        tf = model_flops(cfg, n) * args.batch / t / 1e12
        devices = args.cp * args.tp if args.impl == "ours" else 1
        dec = f"{r['decode'] * 1e3:.2f} | {r['per_token'] * 1e3:.2f}" if "decode" in r else " | "
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        print(f"| {n} | {t * 1e3:.1f} | {args.batch * n / t:,.0f} | {tf:.0f} | {tf / (args.peak * devices):.1%} | "
              f"{r['compile']:.1f} | {dec} | {peak} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        raise RunError(f"{len(failed)} of {len(rows)} prompt lengths failed (see the table); the first, "
                       f"{failed[0]['n']} tokens: {failed[0]['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

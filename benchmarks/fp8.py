"""FP8 weights on one H200 (issue 27): correctness of every FP8 path, then matmul throughput, end-to-end prefill
and decode of FP8 against bf16, and the 122B-A10B in FP8 on one GPU.

    python benchmarks/fp8.py                                   # every part (estimated 8-10 minutes on one H200)
    python benchmarks/fp8.py --parts check,matmul,error,big    # the first run of two (estimated 4-5 minutes) ...
    python benchmarks/fp8.py --parts models                    # ... and the second (estimated 4-6 minutes)
    (--models qwen3.5-35b-a3b --tokens 32768 and --big-tokens N shorten them further)

Parts (`--parts`, comma-separated; the table of each comes last, in this order):
- check: each FP8 implementation on the GPU against the product with the dequantized weights in fp32
  (kernels/fp8/reference.py, HIGHEST precision), fresh random inputs, bf16 activations, relative L2 error:
  weight-only (tokamax quantized ragged_dot, one group and grouped; XLA dequantize + dot; dequantize + our
  Mosaic GPU grouped matmul) tol 1e-2; w8a8 (XLA FP8 dots per 128-block, dense and grouped; jax.nn.scaled_matmul
  with the same scales) against the reference's w8a8 value, tol 1e-2, and its distance to the weight-only
  product printed beside. Exit 1 if one fails (the later parts still run).
- matmul: ms and TFLOP/s at the projection shapes of qwen3.5-9b / 27b / 35b-a3b (MATMULS), prefill rows (8192)
  and decode rows (1 token: 1 row, or its 8 routed rows over the experts): bf16 `jnp.dot`; weight-only FP8
  (tokamax, XLA); w8a8 (XLA per block; `jax.nn.scaled_matmul`, which on Hopper XLA expands to dequantize + dot); and XLA's FP8
  dot with one scale per tensor, the FP8 tensor-core ceiling no block-scaled path can pass.
- error: demo preset (random weights quantized to FP8), 2048 tokens: relative L2 error of the full-sequence
  logits against the fp32 model of the dequantized weights, for bf16 (dequantized), FP8 weight-only and w8a8.
- models: qwen3.5-35b-a3b and qwen3.5-27b (random weights; FP8 = the same shapes quantized on the device),
  bf16 against FP8 weight-only: prefill time at MODEL_TOKENS (median of REPS after a compiling call) and the
  decode step (median of DECODE steps), with the speedups (the issue's goals: prefill >= 1.4x, decode >= 1.6x).
- big: qwen3.5-122b-a10b in FP8 on one GPU (it needs two in bf16): the longest prompt `memory_estimate` says
  fits (capped by --big-tokens), its time to first token (one compiling call, then one timed call) and the
  decode step; a length that runs out of memory is halved and retried.
XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95 here (the 122B's 115 GiB).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from peaks import BF16_TFLOPS  # noqa: E402
from pcp_jax.cli.bench import first_and_median  # noqa: E402
from pcp_jax.config import PRESETS  # noqa: E402
from pcp_jax.kernels.fp8 import reference, tokamax_gpu, xla_gpu  # noqa: E402
from pcp_jax.kernels.moe import mosaic_gpu  # noqa: E402
from timing import bench, check, header, rel_err  # noqa: E402

BLOCK = reference.BLOCK
# (label, K, N, experts or 0 for a dense matmul): the projections of the presets (y = x @ W, W [K, N]).
MATMULS = [("9b mlp up", 4096, 12288, 0), ("9b mlp down", 12288, 4096, 0), ("27b mlp up", 5120, 17408, 0),
           ("27b mlp down", 17408, 5120, 0), ("35b experts up", 2048, 512, 256), ("35b experts down", 512, 2048, 256)]
PREFILL_ROWS, DECODE_ROWS = 8192, 1
MODELS = ["qwen3.5-35b-a3b", "qwen3.5-27b"]
MODEL_TOKENS = [32768, 131072]
REPS, DECODE = 1, 8  # timed prefills after the compiling one; timed decode steps
HIGHEST = jax.lax.Precision.HIGHEST


def fp8_weight(key, shape):
    """Random N(0, 1/K) weights [..., N, K] quantized per 128x128 block: (values, scale, dequantized fp32)."""
    w = jax.random.normal(key, shape, jnp.float32) * shape[-1] ** -0.5
    values, scale = reference.quantize(w, BLOCK)
    return values, scale, reference.dequantize(values, scale, BLOCK, jnp.float32)


def routing(key, rows: int, experts: int):
    """Group sizes of `rows` routed rows over `experts` (a random top-8 routing's counts)."""
    k = min(8, experts)
    _, top = jax.lax.top_k(jax.random.normal(key, (rows // k, experts), jnp.float32), k)
    return jnp.bincount(top.reshape(-1), length=experts).astype(jnp.int32)


def scaled_matmul_w8a8(x, values, scale):
    """w8a8 through jax.nn.scaled_matmul: e4m3 activations with their per-token 128-group scales, e4m3 weights
    [N, K] with the block scales repeated over each block's rows (its 1-D block layout)."""
    xq, sx = reference.quantize_activations(x, BLOCK[1])
    rows = jnp.repeat(scale, BLOCK[0], axis=0)[: values.shape[0]]
    out = jax.nn.scaled_matmul(xq[None], values[None], sx[None], rows[None], preferred_element_type=jnp.float32)
    return out[0].astype(x.dtype)


def fp8_dot_per_tensor(x, values):
    """XLA's FP8 dot with one scale per operand (cuBLASLt FP8 GEMM): x cast to e4m3, fp32 result, as bf16."""
    return jax.lax.dot_general(x.astype(jnp.float8_e4m3fn), values, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x.dtype)


DENSE = {  # name -> fn(x [M, K] bf16, values [N, K], scale) -> [M, N]
    "tokamax weight-only": lambda x, v, s: tokamax_gpu.matmul(x, v, s, BLOCK),
    "XLA weight-only": lambda x, v, s: reference.matmul(x, v, s, BLOCK, "weights"),
    "XLA w8a8 per block": lambda x, v, s: xla_gpu.matmul_w8a8(x, v, s, BLOCK),
    "scaled_matmul w8a8": scaled_matmul_w8a8,
}
GROUPED = {  # name -> fn(x [M, K] bf16, values [E, N, K], scale, sizes) -> [M, N]
    "tokamax weight-only": lambda x, v, s, g: tokamax_gpu.grouped_matmul(x, v, s, BLOCK, g),
    "dequantize + mosaic": lambda x, v, s, g: mosaic_gpu.grouped_matmul(
        x, jnp.swapaxes(reference.dequantize(v, s, BLOCK, x.dtype), 1, 2), g),
    "XLA w8a8 per block": lambda x, v, s, g: xla_gpu.grouped_matmul_w8a8(x, v, s, BLOCK, g),
}
W8A8 = ("XLA w8a8 per block", "scaled_matmul w8a8")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


# check -----------------------------------------------------------------------------------------------------
def part_check(rows: list) -> bool:
    ok = True
    keys = jax.random.split(jax.random.key(0), 4)
    values, scale, w = fp8_weight(keys[0], (1536, 1024))
    for M in (8, 640):
        x = jax.random.normal(keys[1], (M, 1024), jnp.bfloat16)
        xf = x.astype(jnp.float32)
        weight_only = jnp.dot(xf, w.T, precision=HIGHEST)
        w8a8 = reference.matmul(xf, values, scale, BLOCK, "dynamic")
        for name, fn in DENSE.items():
            try:
                out = jax.jit(fn)(x, values, scale)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  [FAIL] dense {name} M={M}: {_first_line(e)}", flush=True)
                rows.append(("check", f"dense {name} M={M}", "error", ""))
                ok = False
                continue
            want = w8a8 if name in W8A8 else weight_only
            err = rel_err(out, want)
            good = check(f"dense {name} M={M}", err, 1e-2)
            ok &= good
            rows.append(("check", f"dense {name} M={M}", f"{err:.2e} vs w8a8 ref" if name in W8A8 else f"{err:.2e}",
                         f"{rel_err(out, weight_only):.2e}"))
    sizes = jnp.array([300, 0, 123, 77, 200, 0, 1, 250], jnp.int32)
    values, scale, w = fp8_weight(keys[2], (8, 1024, 512))
    x = jax.random.normal(keys[3], (1000, 512), jnp.bfloat16).at[int(sizes.sum()):].set(jnp.nan)
    xf = jnp.nan_to_num(x.astype(jnp.float32))
    with jax.default_matmul_precision("highest"):
        weight_only = reference.grouped_matmul(xf, values, scale, BLOCK, sizes, "weights")
        w8a8 = reference.grouped_matmul(xf, values, scale, BLOCK, sizes, "dynamic")
    for name, fn in GROUPED.items():
        try:
            out = jax.jit(fn)(x, values, scale, sizes)
        except Exception as e:  # noqa: BLE001
            print(f"  [FAIL] grouped {name}: {_first_line(e)}", flush=True)
            rows.append(("check", f"grouped {name}", "error", ""))
            ok = False
            continue
        want = w8a8 if name in W8A8 else weight_only
        err = rel_err(jnp.nan_to_num(out, nan=1e6), want)  # a leaked NaN row fails
        ok &= check(f"grouped {name}", err, 1e-2)
        rows.append(("check", f"grouped {name}", f"{err:.2e}", f"{rel_err(jnp.nan_to_num(out), weight_only):.2e}"))
    return ok


# matmul ----------------------------------------------------------------------------------------------------
def part_matmul(rows: list) -> None:
    key = jax.random.key(1)
    for label, K, N, E in MATMULS:
        for M in (PREFILL_ROWS, 8 if E else DECODE_ROWS):  # decode: one token (its 8 routed rows for experts)
            shape = (E, N, K) if E else (N, K)
            values, scale, w = fp8_weight(key, shape)
            w_bf16 = jnp.swapaxes(w, -1, -2).astype(jnp.bfloat16)
            del w
            x = jax.random.normal(key, (M, K), jnp.bfloat16)
            flops = 2.0 * M * K * N
            if E:
                sizes = routing(key, M, E)
                impls = {"bf16 (our Mosaic kernel)": lambda: bench(jax.jit(mosaic_gpu.grouped_matmul), x, w_bf16, sizes, reps=5)}
                impls |= {n: (lambda fn=fn: bench(jax.jit(fn), x, values, scale, sizes, reps=5)) for n, fn in GROUPED.items()}
            else:
                impls = {"bf16 jnp.dot": lambda: bench(jax.jit(jnp.dot), x, w_bf16, reps=5),
                         "FP8 dot, one scale per tensor": lambda: bench(jax.jit(fp8_dot_per_tensor), x, values, reps=5)}
                impls |= {n: (lambda fn=fn: bench(jax.jit(fn), x, values, scale, reps=5)) for n, fn in DENSE.items()}
            for name, run in impls.items():
                try:
                    ms = run()
                    rows.append(("matmul", label, M, name, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}"))
                except Exception as e:  # noqa: BLE001
                    rows.append(("matmul", label, M, name, _first_line(e), ""))
                print(f"  {label} M={M} {name}: {rows[-1][4]} ms", flush=True)
            del values, scale, w_bf16
            gc.collect()


# error -----------------------------------------------------------------------------------------------------
def part_error(rows: list) -> None:
    from pcp_jax.engine import Model
    from pcp_jax.weights import SCALE, fp8_names, random_params

    cfg = PRESETS["demo"]
    params = {k: np.asarray(v) for k, v in random_params(cfg, seed=1, dtype=jnp.float32).items()}
    for name in fp8_names(cfg):
        values, scale = reference.quantize(jnp.asarray(params[name]), BLOCK)
        params[name], params[name + SCALE] = np.asarray(values), np.asarray(scale)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 2048))
    with jax.default_matmul_precision("highest"):
        ref = Model(cfg, dict(params), dtype="float32", kernels="jnp", weights="dequantize").logits(ids)
    for label, weights in (("bf16 (dequantized weights)", "dequantize"), ("FP8 weight-only", "fp8"),
                           ("FP8 w8a8", "fp8-w8a8")):
        try:
            got = Model(cfg, dict(params), dtype="bfloat16", weights=weights).logits(ids)
            rows.append(("error", label, f"{rel_err(got, ref):.2e}"))
        except Exception as e:  # noqa: BLE001
            rows.append(("error", label, _first_line(e)))
        print(f"  logits error, {label}: {rows[-1][2]}", flush=True)


# models ----------------------------------------------------------------------------------------------------
def build(name: str, weights: str):
    from pcp_jax.engine import Model
    from pcp_jax.weights import RandomSource

    cfg = PRESETS[name]
    t0 = time.perf_counter()
    model = Model(cfg, RandomSource(cfg, seed=0, fp8=weights != "bf16"), dtype="bfloat16",
                  weights="auto" if weights == "bf16" else weights)
    print(f"  {name} {weights}: built in {time.perf_counter() - t0:.0f} s ({model.weights_mode})", flush=True)
    return model


def time_prefill(model, n: int, decode: int, reps: int) -> dict:
    """Prefill of n random tokens (first call, then the median of `reps`), then `decode` timed decode steps."""
    ids = np.random.default_rng(n).integers(0, model.cfg.vocab_size, (1, n))

    def prefill():
        state = model.prefill(ids, max_new_tokens=decode + 1)
        state.logits.block_until_ready()
        return state

    first, median, state = first_and_median(prefill, reps)
    out = {"first": first, "prefill": median}
    if decode:
        tok = np.asarray(ids[:, -1], np.int32)
        model.decode_step(state, tok, 0).block_until_ready()
        steps = []
        for step in range(1, decode + 1):
            t0 = time.perf_counter()
            model.decode_step(state, tok, step).block_until_ready()
            steps.append(time.perf_counter() - t0)
        out["decode"] = statistics.median(steps)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    out["peak_gib"] = peak / 2**30 if peak else None
    return out


def part_models(rows: list, names, lengths) -> None:
    for name in names:
        results = {}
        for weights in ("bf16", "fp8"):
            try:
                model = build(name, weights)
            except Exception as e:  # noqa: BLE001
                rows.append(("models", name, weights, "build", _first_line(e)))
                continue
            for n in lengths:
                try:
                    r = time_prefill(model, n, DECODE, REPS)
                    results[(weights, n)] = r
                    print(f"  {name} {weights} {n}: prefill {r['prefill'] * 1e3:.0f} ms (first {r['first']:.1f} s), "
                          f"decode step {r['decode'] * 1e3:.2f} ms", flush=True)
                except Exception as e:  # noqa: BLE001
                    rows.append(("models", name, weights, n, _first_line(e)))
                    print(f"  {name} {weights} {n}: {_first_line(e)}", flush=True)
            del model
            gc.collect()
        for n in lengths:
            b, f = results.get(("bf16", n)), results.get(("fp8", n))
            if b and f:
                rows.append(("models", name, n, f"{b['prefill'] * 1e3:.0f}", f"{f['prefill'] * 1e3:.0f}",
                             f"{b['prefill'] / f['prefill']:.2f}x", f"{b['decode'] * 1e3:.2f}",
                             f"{f['decode'] * 1e3:.2f}", f"{b['decode'] / f['decode']:.2f}x"))


# big -------------------------------------------------------------------------------------------------------
def part_big(rows: list, cap: int) -> None:
    from pcp_jax.memory import memory_estimate

    name = "qwen3.5-122b-a10b"
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    est = memory_estimate(PRESETS[name], budget_bytes=limit, weights="fp8")
    n = min(est["max_prompt_tokens"] or cap, cap)
    print(f"  {name} FP8: {est['weights_bytes'] / 2**30:.1f} GiB of weights, budget {limit / 2**30:.1f} GiB, "
          f"memory_estimate's longest prompt {est['max_prompt_tokens']}, trying {n}", flush=True)
    try:
        model = build(name, "fp8")
    except Exception as e:  # noqa: BLE001
        rows.append(("big", name, "build", _first_line(e)))
        return
    while n >= 1024:
        try:
            r = time_prefill(model, n, DECODE, reps=1)
            rows.append(("big", name, n, est["max_prompt_tokens"], f"{r['prefill']:.2f}", f"{r['first']:.1f}",
                         f"{r['decode'] * 1e3:.2f}", f"{r['peak_gib']:.1f}" if r["peak_gib"] else ""))
            print(f"  {n} tokens: time to first token {r['prefill']:.2f} s, decode step {r['decode'] * 1e3:.2f} ms",
                  flush=True)
            return
        except Exception as e:  # noqa: BLE001 - out of memory: halve and retry
            print(f"  {n} tokens: {_first_line(e)}; halving", flush=True)
            rows.append(("big", name, n, est["max_prompt_tokens"], _first_line(e), "", "", ""))
            n //= 2
            gc.collect()


# tables ----------------------------------------------------------------------------------------------------
def print_tables(rows: list) -> None:
    tables = {
        "check": ("FP8 paths on the GPU (rel. L2 error against the fp32 reference of the path; the last column "
                  "against the weight-only product)", "| path | error | vs weight-only |"),
        "matmul": (f"matmul throughput (TFLOP/s of the real product; bf16 peak {BF16_TFLOPS:.0f})",
                   "| shape | rows | implementation | ms | TFLOP/s |"),
        "error": ("demo preset, 2048 tokens: logits error against the fp32 model of the dequantized weights",
                  "| weights | rel. L2 error |"),
        "models": ("FP8 (weight-only) against bf16, one H200, random weights",
                   "| preset | tokens | bf16 prefill ms | FP8 prefill ms | speedup | bf16 decode ms | FP8 decode ms "
                   "| speedup |"),
        "big": ("qwen3.5-122b-a10b in FP8 on one H200",
                "| preset | tokens | estimate's longest | TTFT s | first call s | decode step ms | peak GiB |"),
    }
    for part, (title, head) in tables.items():
        mine = [r for r in rows if r[0] == part]
        if not mine:
            continue
        print(f"\n{title}\n{head}\n|{'---|' * (head.count('|') - 1)}")
        for r in mine:
            print("| " + " | ".join(str(c) for c in r[1:]) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="check,matmul,error,models,big",
                   help="comma-separated: check, matmul, error, models, big")
    p.add_argument("--models", default=",".join(MODELS), help="presets of the models part")
    p.add_argument("--tokens", default=",".join(map(str, MODEL_TOKENS)), help="prompt lengths of the models part")
    p.add_argument("--big-tokens", type=int, default=131072, help="cap of the 122B's prompt length")
    args = p.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"check", "matmul", "error", "models", "big"})
    if unknown:
        p.error(f"unknown parts {unknown}")
    print(header(), flush=True)
    rows, ok = [], True
    t0 = time.perf_counter()
    if "check" in parts:
        ok = part_check(rows)
    if "matmul" in parts:
        part_matmul(rows)
    if "error" in parts:
        part_error(rows)
    if "models" in parts:
        part_models(rows, args.models.split(","), [int(t) for t in args.tokens.split(",")])
    if "big" in parts:
        part_big(rows, args.big_tokens)
    print_tables(rows)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; checks {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Decode of a preset on one GPU against its memory floor, for each way decode attends to the KV cache
(`Model(decode_attention=...)`): random bf16 weights made on the device, one prompt (B = 1), cp = tp = 1.

    python benchmarks/decode.py [--preset qwen3.5-9b] [--context 8192,32768,131072] [--steps 32]
                                [--methods dense,pallas]

Per context, a random prompt is prefilled with room for the steps, once per method (the same prompt: the same
cache). Correctness first: each method's first-step logits against "dense"'s, rel. L2 <= 3e-2 (bf16: the paths
round different intermediates; in fp32 they agree to 1e-5, tests/test_decode_fast.py).
Timing, over --steps steps:
  step       one `decode_step` and a wait per step, median (what `pcp-jax bench --decode` reports);
  pipelined  the same steps dispatched back to back, one wait at the end: the device time per step;
  generate   per new token of `Model.decode` (greedy; each step queued before the host reads its token).
Floor = the bytes one step must move (every weight once, of an untied embedding the one row looked up; the
K/V cache up to the context; GDN and conv states read and written) over a bandwidth: "copy" a jitted x + 1 and
"read" a jitted sum over --probe-mib MiB measured here, and the datasheet's (benchmarks/peaks.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from peaks import device
from pcp_jax.config import preset
from pcp_jax.engine import Model
from pcp_jax.kernels.attention.api import DECODE_METHODS
from pcp_jax.memory import gdn_state_bytes, kv_bytes_per_token, weights_bytes_per_device
from pcp_jax.weights import RandomSource, declare
from timing import bench, header

TOLERANCE = 3e-2


def bandwidths(mib: int) -> tuple[float, float]:
    """Bytes/s of a jitted x + 1 (each byte read and written) and of a jitted fp32 sum (read) over mib MiB."""
    x = jnp.ones((mib * 2**19,), jnp.bfloat16)
    copy = bench(jax.jit(lambda a: a + 1), x, reps=10, inner=1) / 1e3
    read = bench(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x, reps=10, inner=1) / 1e3
    return 2 * x.nbytes / copy, x.nbytes / read


def step_bytes(cfg, context: int) -> int:
    """Bytes one decode step at batch 1 reads or writes (bf16 weights and cache)."""
    weights = weights_bytes_per_device(cfg, 1, 2)
    if not cfg.tie_word_embeddings:  # one row of the embedding table is looked up; the LM head is read whole
        vocab, width = declare(cfg)["embed"].shape
        weights -= (vocab - 1) * width * 2
    return weights + int(kv_bytes_per_token(cfg, 1, 2) * context) + 2 * gdn_state_bytes(cfg, 2)


def time_method(model: Model, ids, steps: int):
    """(first-step logits, step ms, pipelined ms, generate ms per token) of model.decode_attention."""
    state = model.prefill(ids, max_new_tokens=2 * steps + 1)
    token = np.asarray(state.logits).argmax(-1).astype(np.int32)
    first = np.asarray(model.decode_step(state, token, 0))  # compiles
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        model.decode_step(state, token, step).block_until_ready()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(steps + 1, 2 * steps + 1):
        out = model.decode_step(state, token, step)
    out.block_until_ready()
    pipelined = (time.perf_counter() - t0) / steps
    state = model.prefill(ids, max_new_tokens=steps + 1)
    model.decode(state, 2)  # compiles the sampling program
    state = model.prefill(ids, max_new_tokens=steps + 1)
    jax.block_until_ready(state.logits)
    t0 = time.perf_counter()
    model.decode(state, steps + 1)  # steps decode steps
    generate = (time.perf_counter() - t0) / steps
    return first, statistics.median(times) * 1e3, pipelined * 1e3, generate * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--context", default="8192,32768,131072")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--methods", default="dense,pallas", help=f"from {DECODE_METHODS}; dense always runs first")
    p.add_argument("--probe-mib", type=int, default=4096)
    args = p.parse_args()
    methods = ["dense"] + [m for m in args.methods.split(",") if m != "dense"]
    cfg = preset(args.preset)
    print(header(), flush=True)
    copy_bw, read_bw = bandwidths(args.probe_mib)
    kind = jax.devices()[0].device_kind
    known = jax.default_backend() == "gpu"  # a CPU smoke run has no datasheet row
    bws = [copy_bw, read_bw] + ([device(kind).hbm_tbps * 1e12] if known else [])
    print("bandwidth: " + ", ".join(f"{bw / 1e9:.0f} GB/s" for bw in bws) + " (copy, read" +
          (", datasheet)" if known else ")"), flush=True)
    model = Model(cfg, RandomSource(cfg, seed=0), cp=1, dtype="bfloat16")
    ok, rows = True, []
    for n in map(int, args.context.split(",")):
        ids = np.random.default_rng(n).integers(0, cfg.vocab_size, (1, n))
        nbytes = step_bytes(cfg, n)
        dense = None
        for method in methods:
            model.decode_attention = method
            logits, step, pipelined, generate = time_method(model, ids, args.steps)
            dense = logits if dense is None else dense
            err = float(np.linalg.norm(logits - dense) / np.linalg.norm(dense))
            ok &= bool(err <= TOLERANCE)
            rows.append((n, method, step, pipelined, generate, nbytes, err))
            print(f"  context {n} {method}: step {step:.2f} ms, pipelined {pipelined:.2f}, generate {generate:.2f} "
                  f"ms/token; logits vs dense {err:.1e}", flush=True)
    print(f"\n{args.preset}, B = 1, bf16, {args.steps} steps; floors in ms at the copy / read / datasheet bandwidth")
    print("| context | method | step ms | pipelined ms | generate ms/token | floor ms | generate / floor | "
          "logits vs dense |\n|---|---|---|---|---|---|---|---|")
    for n, method, step, pipelined, generate, nbytes, err in rows:
        floors = [nbytes / bw * 1e3 for bw in bws]
        print(f"| {n} | {method} | {step:.2f} | {pipelined:.2f} | {generate:.2f} | "
              f"{' / '.join(f'{f:.2f}' for f in floors)} | {' / '.join(f'{generate / f:.2f}' for f in floors)} | "
              f"{err:.1e} {'OK' if err <= TOLERANCE else 'FAIL'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

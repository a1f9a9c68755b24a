"""Decode step and short-prefill time of the scanned layers against the unrolled ones (stacked weights
either way): qwen3.5 preset, random bf16 weights, B=1, one GPU.

  python scripts/bench_decode_layout.py --preset qwen3.5-9b --context 8192,32768 [--steps 16]

For each layout (decode as a scan over layer groups, or unrolled with static slices) prints the median
decode step at each context and the 8k prefill time; the two layouts' greedy tokens must agree (checked
first; with random weights in bf16 a near tie can flip a token, so a disagreement here is a prompt to
look, not by itself an error: tests/test_warmstart.py checks in fp32 that the layouts agree). Run it
under different XLA_FLAGS to compare compiler options.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--context", default="8192,32768")
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    import jax

    from pcp_jax.config import preset
    from pcp_jax.engine import Model
    from pcp_jax.model import random_params

    cfg = preset(args.preset)
    params = random_params(cfg, seed=0, dtype=jax.numpy.bfloat16)
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    tokens = {}
    for scan in (True, False):
        model = Model(cfg, params, dtype="bfloat16", scan_decode=scan)
        row = []
        for n in map(int, args.context.split(",")):
            ids = np.random.default_rng(n).integers(0, cfg.vocab_size, (1, n))
            state = model.prefill(ids, max_new_tokens=args.steps + 1)
            tok = np.asarray(state.logits).argmax(-1).astype(np.int32)
            seq = [tok]
            model.decode_step(state, tok, 0).block_until_ready()
            times = []
            for step in range(1, args.steps + 1):
                t0 = time.perf_counter()
                logits = model.decode_step(state, seq[-1], step)
                logits.block_until_ready()
                times.append(time.perf_counter() - t0)
                seq.append(np.asarray(logits).argmax(-1).astype(np.int32))
            tokens.setdefault(n, []).append(np.stack(seq))
            row.append(f"decode @{n}: {statistics.median(times) * 1e3:.2f} ms")
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8192))
        model.prefill(ids).logits.block_until_ready()
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            model.prefill(ids).logits.block_until_ready()
            t.append(time.perf_counter() - t0)
        row.append(f"prefill 8k: {statistics.median(t) * 1e3:.1f} ms")
        print(f"{'scan' if scan else 'unrolled'} decode: " + ", ".join(row), flush=True)
        del model
    same = all(np.array_equal(a, b) for a, b in tokens.values())
    print(f"greedy tokens of the two layouts agree: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

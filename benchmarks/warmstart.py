"""Warm start on a GPU: how long `Model.warmup` takes, and what a session of prompts of random lengths
costs after it (qwen3.5 preset, random bf16 weights, one process, one mesh).

  python benchmarks/warmstart.py --preset qwen3.5-9b --cp 2 --max-tokens 131072 --session 20

Prints: warmup time and program count; for each of `--session` random lengths in [--min-tokens,
--max-tokens] its time to first token and the number of backend compiles it caused (goal: 0); then the
padding overhead: every bucket length of the ladder is itself an exact length (no padding), so timing
each bucket once gives exact-length times t(n) at those n; a least-squares fit t(n) = a + b n + c n^2
over them (every other bucket) estimates the exact-length time of the session's lengths, and the overhead is the mean of
t(bucket(n)) / t_fit(n) - 1. A correctness check runs first: the logits of one prompt at its bucket equal
those of the same prompt fed in pieces (chunk_size="auto" vs one shot) within bf16 rounding.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=131072)
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--session", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=0, help="decode room warmed and reserved (0: prefill only)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import jax

    from pcp_jax.buckets import ladder
    from pcp_jax.config import preset
    from pcp_jax.engine import Model
    from pcp_jax.weights import random_params

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None)
    cfg = preset(args.preset)
    t0 = time.perf_counter()
    model = Model(cfg, random_params(cfg, seed=0, dtype=jax.numpy.bfloat16), cp=args.cp, dtype="bfloat16",
                  consume_params=True)
    print(f"model built in {time.perf_counter() - t0:.1f} s; auto piece {model.auto_piece_tokens} tokens "
          f"(budget {model.prefill_budget_bytes / 2**30:.1f} GiB per device)", flush=True)
    rng = np.random.default_rng(args.seed)

    n_before = len(compiles)
    stats = model.warmup(args.max_tokens, max_new_tokens=args.max_new_tokens, logits=False, workers=args.workers)
    print(f"warmup({args.max_tokens}) at cp={args.cp}: {stats['seconds']:.1f} s, {stats['programs']} programs, "
          f"{len(compiles) - n_before} backend compiles ({sum(compiles[n_before:]):.1f} s of compile time summed "
          f"over threads)", flush=True)

    def ttft(ids):
        t = time.perf_counter()
        model.prefill(ids, max_new_tokens=args.max_new_tokens).logits.block_until_ready()
        return time.perf_counter() - t

    lengths = sorted(rng.integers(args.min_tokens, args.max_tokens + 1, args.session).tolist())
    rows, session_compiles = [], 0
    for n in lengths:
        before = len(compiles)
        t = ttft(rng.integers(0, cfg.vocab_size, (1, n)))
        session_compiles += len(compiles) - before
        rows.append((n, t, len(compiles) - before))
        print(f"  session prompt of {n:7d} tokens: {t * 1e3:9.1f} ms, {len(compiles) - before} compiles", flush=True)
    print(f"session: {len(lengths)} prompts, {session_compiles} backend compiles, total {sum(r[1] for r in rows):.1f} s")

    unit = 2 * args.cp * 64
    buckets = [b for b in ladder(args.max_tokens, unit) if b >= min(lengths) // 2 and b <= model.auto_piece_tokens][::2]
    exact = []
    for b in buckets:  # a bucket length is an exact length: no padding
        ids = rng.integers(0, cfg.vocab_size, (1, b))
        exact.append((b, statistics.median(ttft(ids) for _ in range(2))))
    xs = np.array([b for b, _ in exact], np.float64)
    ys = np.array([t for _, t in exact], np.float64)
    coef = np.polyfit(xs, ys, 2)
    fit = lambda n: float(np.polyval(coef, n))
    resid = float(np.max(np.abs(np.polyval(coef, xs) - ys) / ys))
    over = [t / fit(n) - 1 for n, t, _ in rows if n <= model.auto_piece_tokens]
    print(f"exact-length fit over {len(exact)} bucket lengths (max rel. residual {resid:.1%}); padding overhead on "
          f"the session's one-shot prompts: mean {statistics.mean(over):.1%}, max {max(over):.1%} ({len(over)} prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Start-up on a GPU: from process start to ready, to fully refined, and a restart on the store (issue 24).

  python benchmarks/warmstart.py --store DIR [--preset qwen3.5-9b] [--cp 1] [--max-tokens 131072]
      [--max-new-tokens 0] [--session 20] [--fit]

One process, random bf16 weights made on the device. Prints, in seconds from process start: JAX up, weights on
the device, `warmup(max_tokens, background=True)` ready (every length <= max_tokens served by the coarse
ladder), fully refined (the fine ladder compiled or loaded); the programs compiled and loaded; trace, lower and
compile seconds per program kind (from `jax.monitoring` events, which name the program); then a session of
`--session` random lengths in [--min-tokens, --max-tokens] right after ready (refinement still running) and the
same lengths after refinement: each length's time to first token and the backend compiles it caused on the
calling thread (goal 0). With `--fit`, the padding overhead after refinement: every ladder length is itself an
exact length (no padding), so timing some of them gives exact-length times; a fit t(n) = a + b n + c n^2
estimates the exact-length time of the session's lengths, and the overhead is t(bucket(n)) / t_fit(n) - 1.
Run it twice on the same --store: the first is a cold start, the second a restart.
Correctness: each session prompt's next-token logits right after ready (coarse programs) and after refinement
(fine programs: other padding) agree within bf16 rounding (printed as the largest relative difference).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import collections  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402

# Two bf16 runs of one prompt with different padding each carry bf16's rounding (2.5e-2 from fp32 for these
# presets: docs/BENCHMARKS.md, the in-model check), so they may differ by up to about twice that.
BF16_PAIR = 6e-2
TRACE, LOWER, COMPILE = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                         "/jax/core/compile/backend_compile_duration")


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="compile-cache folder (empty for a cold start)")
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=131072)
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=0, help="decode room warmed (0: prefill only)")
    p.add_argument("--new-tokens", type=int, default=0, help="tokens each session request generates")
    p.add_argument("--session", type=int, default=20)
    p.add_argument("--fit", action="store_true", help="time exact ladder lengths for the padding overhead")
    p.add_argument("--ready-only", action="store_true", help="stop after the session right after ready (no refinement)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import jax

    from pcp_jax.buckets import ladder
    from pcp_jax.config import preset
    from pcp_jax.engine import Model
    from pcp_jax.weights import RandomSource

    main_thread = threading.get_ident()
    stages = collections.defaultdict(list)  # (event, program kind) -> seconds
    on_main = []

    def listen(event, secs, fun_name="", **_):
        if event in (TRACE, LOWER, COMPILE):
            fun_name = fun_name.removeprefix("jit(").removesuffix(")")  # lowering and compile say jit(name)
            stages[event, fun_name].append(secs)
            if event == COMPILE and threading.get_ident() == main_thread:
                on_main.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    since = lambda: time.perf_counter() - START
    jax.devices()
    t_jax = since()
    cfg = preset(args.preset)
    model = Model(cfg, RandomSource(cfg, seed=0), cp=args.cp, dtype="bfloat16", compile_cache_dir=args.store)
    jax.block_until_ready(model.weights)
    t_weights = since()
    print(f"[{args.preset} cp={args.cp}] JAX up {t_jax:.1f} s; weights on the device {t_weights:.1f} s; auto piece "
          f"{model.auto_piece_tokens} tokens", flush=True)

    stats = model.warmup(args.max_tokens, max_new_tokens=args.max_new_tokens, logits=False, background=True,
                         progress=False)
    t_ready = since()
    print(f"ready {t_ready:.1f} s ({t_ready - t_weights:.1f} s after the weights): {stats}", flush=True)

    rng = np.random.default_rng(args.seed)
    lengths = sorted(int(n) for n in rng.integers(args.min_tokens, args.max_tokens + 1, args.session))
    prompts = {n: rng.integers(0, cfg.vocab_size, (1, n)) for n in lengths}

    logits = {}

    def ttft(n, keep=None):
        t = time.perf_counter()
        state = model.prefill(prompts[n] if n in prompts else rng.integers(0, cfg.vocab_size, (1, n)),
                              max_new_tokens=args.new_tokens)
        state.logits.block_until_ready()
        elapsed = time.perf_counter() - t
        if keep is not None:
            logits[keep, n] = np.asarray(state.logits)
        if args.new_tokens:
            model.decode(state, args.new_tokens)
        return elapsed

    def session(label):
        rows = []
        for n in lengths:
            before, pending = len(on_main), model.compile_status()["pending"]
            rows.append((n, ttft(n, keep=label), len(on_main) - before, pending))
            print(f"  {n:7d} tokens: {rows[-1][1] * 1e3:8.1f} ms, {rows[-1][2]} compiles, {pending} pending", flush=True)
        compiles = sum(r[2] for r in rows)
        print(f"session {label}: {len(rows)} prompts, {compiles} compiles on the calling thread, "
              f"{sum(r[1] for r in rows):.1f} s in all; pending at each: {[r[3] for r in rows]}", flush=True)
        return rows

    during = session("right after ready")
    if args.ready_only:
        print(f"\n| {args.preset} cp={args.cp} | weights | ready | programs (coarse ready) | session compiles | "
              f"TTFT{' + ' + str(args.new_tokens) + ' tokens' if args.new_tokens else ''} |")
        print(f"| s from start | {t_weights:.1f} | {t_ready:.1f} | {stats['programs']} ({stats['compiled']} compiled, "
              f"{stats['loaded']} loaded) | {sum(r[2] for r in during)} | "
              f"{', '.join(f'{n}: {t:.2f} s' for n, t, _, _ in during)} |", flush=True)
        import os
        os._exit(0)  # leave the refinement in flight behind (its compiles would hold the exit)
    while model.compile_status()["pending"]:
        time.sleep(0.5)
    t_refined = since()
    status = model.compile_status()
    print(f"fully refined {t_refined:.1f} s ({t_refined - t_weights:.1f} s after the weights): {status}", flush=True)
    after = session("after refinement")
    rel = max(float(np.linalg.norm(logits["right after ready", n] - logits["after refinement", n])
                    / np.linalg.norm(logits["after refinement", n])) for n in lengths)
    print(f"check: next-token logits right after ready vs after refinement, largest relative difference "
          f"{rel:.2e} ({'OK' if rel <= BF16_PAIR else 'TOO LARGE'} for two bf16 runs)", flush=True)

    print("per program kind (mean s, count): trace / lower / compile", flush=True)
    from pcp_jax.programs import Alloc, CopyBlock, CopyStates, Decode, Prefill, RestoreBlock, Sample
    kinds = {sig.kind for sig in (Alloc, CopyBlock, CopyStates, Decode, Prefill, RestoreBlock, Sample)}
    for kind in sorted({k for _, k in stages} & kinds):
        cells = []
        for event in (TRACE, LOWER, COMPILE):
            v = stages.get((event, kind), [])
            cells.append(f"{statistics.mean(v):.2f} ({len(v)})" if v else "-")
        if any(c != "-" for c in cells):
            print(f"  {kind:14s} " + " / ".join(cells))

    if args.fit:
        unit = 2 * args.cp * 64
        buckets = [b for b in ladder(args.max_tokens, unit) if min(lengths) // 2 <= b <= model.auto_piece_tokens][::2]
        exact = [(b, statistics.median(ttft(b) for _ in range(2))) for b in buckets]
        coef = np.polyfit([b for b, _ in exact], [t for _, t in exact], 2)
        for label, rows in (("right after ready", during), ("after refinement", after)):
            over = [t / float(np.polyval(coef, n)) - 1 for n, t, _, _ in rows if n <= model.auto_piece_tokens]
            print(f"padding overhead {label}: mean {statistics.mean(over):.1%}, max {max(over):.1%} "
                  f"({len(over)} one-piece prompts; fit over {len(exact)} ladder lengths)", flush=True)

    print(f"\n| {args.preset} cp={args.cp} | weights | ready | refined | programs | compiled | loaded | "
          f"session compiles (during / after) | TTFT sum (during / after) |")
    print(f"| s from start | {t_weights:.1f} | {t_ready:.1f} | {t_refined:.1f} | {stats['programs']} | "
          f"{status['compiled']} | {status['loaded']} | {sum(r[2] for r in during)} / {sum(r[2] for r in after)} | "
          f"{sum(r[1] for r in during):.1f} / {sum(r[1] for r in after):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

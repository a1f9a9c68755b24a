"""Decode step of a preset (random bf16 weights, B = 1, cp = 1, one device) against its memory floor, for
each decode variant on the same weights and cache (issue 17).

  python scripts/bench_decode_step.py --preset qwen3.5-9b --context 8192,32768,131072 --steps 32 \
      [--variants dense,split,split-sum] [--fill prefill|random] [--xla-flags "..."] [--profile DIR]
  (CPU smoke test: --preset demo --context 256,1024 --steps 4 --copy-mib 32)

Per context: the cache is filled (`prefill`: a random prompt through Model.prefill; `random`: the same
cache shape with random K/V, GDN and conv states, positions 0..n-1, which skips compiling prefill
programs), with room for every step run here. Variants (`Model.decode_attention`): "dense" (one softmax
over the cache; the default), "split" and "split-sum" (split along the cache length, merged by
log-sum-exp: pcp_jax/kernels/attention/decode.py), "pallas" (a Pallas kernel reading the layer's filled
blocks of the stacked cache in place: kernels/attention/decode_pallas.py). Each variant starts from its own
copy of the same cache.

Correctness first: every variant's first-step logits against dense's, relative L2 error within 3e-2 (bf16:
the paths round different intermediates; in fp32 they agree to 1e-5, tests/test_decode_fast.py); the run
goes on after a failure, which is marked in the table and makes the exit status 1.

Timing, median over --steps steps:
  step       one `decode_step` + block_until_ready per step (`pcp-jax bench --decode`: "decode step");
  pipelined  --steps steps dispatched back to back, one wait at the end, divided by --steps: the device
             time when the host keeps ahead (step - pipelined = host time per step the device waits on).
  generate   per new token of `Model.generate`'s decode loop (`Model._decode_loop`, greedy sampling on
             the device, each step queued before the host reads the sampled token) over --steps tokens.
  synced     the loop before 2026-11-30 (tokens to the host, then `decode_step`), for comparison.
Floor = bytes one step must move / the HBM bandwidth measured here: "copy" a jitted x + 1 over --copy-mib MiB
(read + write), "read" a jitted sum over the same array (read only; usually the higher one). Bytes: every
parameter of the model once (summed over the model's arrays; of an untied embedding table only the one row
looked up), the K/V cache up to the context (read), GDN recurrent and conv states (read + write).

--profile DIR: after timing, traces --profile-steps steps of dense and of the fastest other variant at
--profile-context, and prints per step the GPU kernels' busy time, count and idle time between them, and
the 15 kernels (grouped by name without numeric suffixes) that took the most time. While profiling, XLA
runs kernel by kernel instead of through command buffers (CUDA graphs), so a traced step can be longer
than a timed one; both are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

METHODS = ("dense", "split", "split-sum", "pallas")
TOLERANCE = 3e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--context", default="8192,32768,131072", help="comma-separated context lengths")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--variants", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    p.add_argument("--fill", choices=["prefill", "random"], default="prefill")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    p.add_argument("--copy-mib", type=int, default=4096, help="size of the bandwidth probe")
    p.add_argument("--profile", metavar="DIR")
    p.add_argument("--profile-context", type=int, default=32768)
    p.add_argument("--profile-steps", type=int, default=3)
    args = p.parse_args(argv)
    args.context = [int(c) for c in args.context.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in METHODS]
    if bad or args.steps < 1 or min(args.context) < 1:
        p.error(f"bad --variants {bad} (choose from {METHODS}), --steps or --context")
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")  # the reference every variant is checked against
    return args


def _median_seconds(f, x) -> float:
    """Median seconds of one call of f(x), each waited for (scripts/burst_timing.py, bursts of one call;
    imported here: it imports jax, which must follow --xla-flags)."""
    from burst_timing import bench
    return bench(f, x, reps=10, inner=1)[0] / 1e3


def hbm_bandwidth(mib: int) -> float:
    """Bytes/s of a jitted elementwise x + 1 over `mib` MiB of bf16 (reads and writes each byte once)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((mib * 2**19,), jnp.bfloat16)
    return 2 * x.nbytes / _median_seconds(jax.jit(lambda a: a + 1), x)


def hbm_read_bandwidth(mib: int) -> float:
    """Bytes/s of a jitted fp32-accumulated sum over `mib` MiB of bf16 (reads each byte once)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((mib * 2**19,), jnp.bfloat16)
    return x.nbytes / _median_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x)


def weight_bytes(model) -> int:
    """Bytes of parameters one step reads: every array of the model, of an untied embedding table one row."""
    import jax
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(model._state)[0]:
        if "'embed'" in jax.tree_util.keystr(path) and not model.cfg.tie_word_embeddings:
            total += leaf.nbytes // leaf.shape[0]
        else:
            total += leaf.nbytes
    return total


def step_bytes(model, state, n: int) -> dict:
    c = state.caches
    slots = c["k"].shape[2]
    return {"weights": weight_bytes(model), "kv": (c["k"].nbytes + c["v"].nbytes) * n // slots,
            "gdn": 2 * (c["state"].nbytes + c["conv"].nbytes)}


def random_state(model, n: int, new: int):
    """What a prefill of n tokens leaves (cp = 1), with random K/V, GDN and conv states."""
    import jax
    import jax.numpy as jnp

    from pcp_jax.engine import PrefillResult
    if model.cp != 1 or model.tp != 1:
        raise SystemExit("--fill random supports cp = 1, tp = 1 only")
    prefill_slots, slots = model._slots(model._pieces(n, "auto"), new)
    caches, kpos = model._alloc_fn(1, slots)()

    def fill(caches, kpos):
        keys = jax.random.split(jax.random.key(n), 4)
        rnd = lambda key, a, s: (jax.random.normal(key, a.shape, jnp.float32) * s).astype(a.dtype)
        out = {"k": rnd(keys[0], caches["k"], 1.0), "v": rnd(keys[1], caches["v"], 1.0),
               "state": rnd(keys[2], caches["state"], 0.05), "conv": rnd(keys[3], caches["conv"], 1.0)}
        idx = jnp.arange(kpos.shape[1], dtype=jnp.int32)[None]
        return out, jnp.where(idx < n, idx, -1)

    # keep the mesh shardings alloc gave: a decode program called with other ones compiles again
    shardings = jax.tree.map(lambda a: a.sharding, (caches, kpos))
    caches, kpos = jax.jit(fill, donate_argnums=(0, 1), out_shardings=shardings)(caches, kpos)
    logits = jnp.zeros((1, model.cfg.vocab_size), jnp.float32)
    return PrefillResult(logits, np.array([n], np.int32), caches, kpos, slots, prefill_slots)


def copy_state(state):
    import dataclasses

    import jax
    import jax.numpy as jnp
    return dataclasses.replace(state, caches=jax.tree.map(jnp.copy, state.caches), kpos=jnp.copy(state.kpos))


def time_variant(model, base, tok, steps: int):
    """(first-step logits, step times [s], pipelined seconds per step) of model.decode_attention."""
    st = copy_state(base)
    logits0 = np.asarray(model.decode_step(st, tok, 0))  # compiles
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        model.decode_step(st, tok, step).block_until_ready()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(steps + 1, 2 * steps + 1):
        out = model.decode_step(st, tok, step)
    out.block_until_ready()
    return logits0, times, (time.perf_counter() - t0) / steps, st


def time_loops(model, base, steps: int):
    """Seconds per new token of Model._decode_loop (generate's loop) and of the synced loop it replaced."""
    import jax

    from pcp_jax.engine import REPLICATED, to_host
    model._decode_loop(copy_state(base), 2)  # compiles the sampling program
    st = copy_state(base)
    jax_block(st)
    t0 = time.perf_counter()
    model._decode_loop(st, steps + 1)  # steps decode steps, steps + 1 samples
    loop = (time.perf_counter() - t0) / steps

    sample = model._sample_fn(True)
    settings = model._sampling_settings(0.0, None, None)
    key = jax.random.key(0)
    B = len(base.lengths)
    st = copy_state(base)
    jax_block(st)
    logits = st.logits
    t0 = time.perf_counter()
    for step in range(steps + 1):
        feed = np.concatenate([np.full(B, -1, np.int32), np.zeros(B + 2, np.int32), np.array([step], np.int32)])
        tok = to_host(sample(logits, key, *settings, model._place(feed, REPLICATED))[0])
        if step < steps:
            logits = model.decode_step(st, tok, step)
    return loop, (time.perf_counter() - t0) / steps


def jax_block(state):
    import jax
    jax.block_until_ready((state.caches, state.kpos))


def profile_report(log_dir: str, steps: int, timed_ms: float) -> str:
    """The timed step, then per traced step busy/idle GPU time and kernel count, and the top 15 kernel groups by
    time (scripts/trace_table.py); only trace_table's "no GPU kernels" line when the trace holds none."""
    from trace_table import NO_KERNELS, kernel_table
    report = kernel_table(log_dir, steps, unit="step")
    if report == NO_KERNELS:
        return report
    return f"  timed step (command buffers on) {timed_ms:.2f} ms\n{report}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import jax

    from pcp_jax.config import preset
    from pcp_jax.engine import Model
    from pcp_jax.model import RandomSource

    cfg = preset(args.preset)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    bw, bw_read = hbm_bandwidth(args.copy_mib), hbm_read_bandwidth(args.copy_mib)
    print(f"bandwidth probes ({args.copy_mib} MiB): copy (x + 1) {bw / 1e9:.0f} GB/s, read (sum) "
          f"{bw_read / 1e9:.0f} GB/s", flush=True)
    t0 = time.perf_counter()
    model = Model(cfg, RandomSource(cfg, seed=0), cp=1, dtype="bfloat16")
    print(f"model built in {time.perf_counter() - t0:.1f} s; weights read per step "
          f"{weight_bytes(model) / 1e9:.2f} GB", flush=True)
    new = 2 * args.steps + 2 + (args.profile_steps if args.profile else 0)  # also >= generate's steps + 1
    rows, failed, states = [], [], {}
    for n in args.context:
        t0 = time.perf_counter()
        if args.fill == "prefill":
            ids = np.random.default_rng(n).integers(0, cfg.vocab_size, (1, n))
            base = model.prefill(ids, max_new_tokens=new)
            tok = np.asarray(base.logits).argmax(-1).astype(np.int32)
        else:
            base = random_state(model, n, new)
            tok = np.array([1], np.int32)
        jax.block_until_ready(base.caches)
        nbytes = step_bytes(model, base, n)
        floor, floor_read = sum(nbytes.values()) / bw, sum(nbytes.values()) / bw_read
        print(f"context {n}: cache filled ({args.fill}) in {time.perf_counter() - t0:.1f} s, capacity "
              f"{base.slots_per_rank} slots; bytes per step: weights {nbytes['weights'] / 1e9:.2f} GB, "
              f"KV {nbytes['kv'] / 1e9:.3f} GB, GDN {nbytes['gdn'] / 1e9:.3f} GB -> floor {floor * 1e3:.2f} ms "
              f"(copy), {floor_read * 1e3:.2f} ms (read)", flush=True)
        ref = None
        for v in args.variants:
            model.decode_attention = v
            t0 = time.perf_counter()
            try:
                logits0, times, pipe, _ = time_variant(model, base, tok, args.steps)
            except Exception as e:  # e.g. a kernel that does not compile here: report it, time the others
                print(f"  {v}: failed: {str(e).splitlines()[0][:300]}", flush=True)
                failed.append((n, v, float("nan")))
                continue
            ref = logits0 if v == "dense" else ref
            err = float(np.linalg.norm(logits0 - ref) / np.linalg.norm(ref))
            ok = err <= TOLERANCE and np.isfinite(logits0).all()
            if not ok:
                failed.append((n, v, err))
            med = statistics.median(times)
            loop, synced = time_loops(model, base, args.steps)
            rows.append((n, v, med, pipe, loop, synced, floor, floor_read, err, ok))
            print(f"  {v}: step {med * 1e3:.2f} ms, pipelined {pipe * 1e3:.2f} ms, generate {loop * 1e3:.2f} ms, "
                  f"synced {synced * 1e3:.2f} ms, logits rel. err vs dense {err:.1e} {'OK' if ok else 'FAIL'} "
                  f"(compile + run {time.perf_counter() - t0:.1f} s)", flush=True)
        if args.profile and n == args.profile_context:
            states[n] = (base, tok)
        else:
            del base
    print(f"\ndecode step, preset {args.preset}, B = 1, cp = 1, bf16, fill {args.fill}, median of {args.steps} steps, "
          f"floors at {bw / 1e9:.0f} GB/s (copy) and {bw_read / 1e9:.0f} GB/s (read); logits checked against "
          f"dense (rel. L2 <= {TOLERANCE:.0e}); ratios of generate to the floors")
    print("| context | variant | step (ms) | pipelined (ms) | generate (ms/token) | synced (ms/token) | "
          "floor copy / read (ms) | generate / floor copy, read | logits vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, v, med, pipe, loop, synced, floor, floor_read, err, ok in rows:
        print(f"| {n} | {v} | {med * 1e3:.2f} | {pipe * 1e3:.2f} | {loop * 1e3:.2f} | {synced * 1e3:.2f} | "
              f"{floor * 1e3:.2f} / {floor_read * 1e3:.2f} | {loop / floor:.2f}, {loop / floor_read:.2f} | "
              f"{err:.1e} {'OK' if ok else 'FAIL'} |")
    if args.profile:
        n = args.profile_context
        if n not in states:
            print(f"--profile-context {n} is not among --context {args.context}: no profile")
        else:
            base, tok = states[n]
            timed = {v: med for c, v, med, *_ in rows if c == n}
            best = min((v for v in timed if v != "dense"), key=timed.get, default=None)
            for v in ["dense"] + ([best] if best else []):
                model.decode_attention = v
                st = copy_state(base)
                model.decode_step(st, tok, 0).block_until_ready()
                out = os.path.join(args.profile, v)
                jax.profiler.start_trace(out)
                for step in range(1, args.profile_steps + 1):
                    model.decode_step(st, tok, step).block_until_ready()
                jax.profiler.stop_trace()
                print(f"\nprofile of {args.profile_steps} {v} steps at context {n} (trace under {out}):\n"
                      f"{profile_report(out, args.profile_steps, timed[v] * 1e3)}", flush=True)
    if failed:
        print(f"FAIL (context, variant, logits' rel. err; nan: it did not run): {failed}; allowed {TOLERANCE}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

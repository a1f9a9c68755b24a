"""Correctness, then timings, of the GPU kernels behind kernels/*/api.py, in one process on one GPU.

Usage (GPU machine, after installing the package and the wheels of ../shared/device-wheels.sh):
    PYTHONUNBUFFERED=1 python scripts/bench_kernels.py --sections check,gdn,attn,moe --out $OUT

Sections (run in the order given; each catches its own failure, logs it and goes on):
  check : every GPU kernel against the fp32 jnp reference on fresh random inputs
          (bf16 inputs: rel L2 err <= 1e-2; fp32 inputs: <= 1e-4).
  gdn   : chunked gated delta rule forward, B=1, T in {8k, 32k, 128k}, 16 qk heads, 32/64 v heads,
          dk = dv = 128, bf16, vs FLA `chunk_gated_delta_rule` (torch, same GPU, GVA, final state out).
          --profile DIR: after timing --profile-case T:H (default: the largest --gdn-T, 64 value heads),
          traces 3 calls of ours and 3 of FLA's (ours only when FLA does not run) under DIR/gdn_{ours,fla}_T*_Hv*
          and prints per call the GPU kernels' count, busy and idle time, and the top kernel groups
          (scripts/trace_table.py).
  tune  : GDN tiling sweep at 32k / 32 heads, plus the time of each of the three stages.
  gdnvar: GDN variants (`Tiling.fuse`, `stages_fused`, dv block): base (fp32 B2 T1000 Hv4 tol 1e-4) and
          base + the fused forms (bf16 T4096 Hv64 tol 1e-2) against the fp32 reference; every variant
          beside FLA at the first --gdn-T x 32/64 value heads, checked against base there (tol 1e-2);
          at the later T base and the fastest fused ones. Time budget GDNVAR_BUDGET_S; tables at the end.
  attn  : one ring step at hd 256, 32 q / 2 kv heads, unmasked and diagonal, 4k and 16k, through the
          wrapper's paths, vs cuDNN `jax.nn.dot_product_attention(implementation="cudnn")`.
  moe   : the 397B-shape MoE layer (hidden 4096, 512 experts, top-10, expert width 1024) at 8k and 32k
          tokens: router, dispatch, gate/up, down, combine; grouped matmuls through tokamax.ragged_dot.
Timings: warm-up (compile + 2 runs), then `reps` samples of `inner` back-to-back calls each closed by
block_until_ready; the figure is the median sample / inner. Torch timings: triton.testing.do_bench median.
Prints a table per section; writes results.json and the log under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (FLA) shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pcp_jax.kernels.attention import api as att_api  # noqa: E402
from pcp_jax.kernels.attention import reference as att_ref  # noqa: E402
from pcp_jax.kernels.attention import tokamax_gpu as att_gpu  # noqa: E402
from pcp_jax.kernels.gdn import api as gdn_api  # noqa: E402
from pcp_jax.kernels.gdn import pallas_gpu  # noqa: E402
from pcp_jax.kernels.gdn import reference as gdn_ref  # noqa: E402
from pcp_jax.kernels.moe import api as moe_api  # noqa: E402
from pcp_jax.kernels.moe import reference as moe_ref  # noqa: E402
from burst_timing import bench  # noqa: E402  (scripts/ is on sys.path when a script runs)
from trace_table import profile_calls  # noqa: E402

RESULTS: dict = {"rows": [], "checks": [], "errors": []}
PEAK_TFLOPS = 799.0  # measured bf16 8192^3 matmul on this workplace's H100 (KINDS.md, 2026-11-13)


def log(*a):
    print(*a, flush=True)


def rel(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check(name, err, tol):
    ok = bool(np.isfinite(err) and err <= tol)
    RESULTS["checks"].append(dict(name=name, rel_err=err, tol=tol, ok=ok))
    log(f"  [{'PASS' if ok else 'FAIL'}] {name}: rel err {err:.2e} (tol {tol:.0e})")
    return ok


def row(section, name, ms, **extra):
    r = dict(section=section, name=name, ms=ms, **extra)
    RESULTS["rows"].append(r)
    ex = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    log(f"  {section:5s} {name:44s} {ms:9.3f} ms  {ex}")


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def gdn_inputs(seed, B, T, Hk, G, dk, dv, dtype, with_state):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    unit = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
    q = unit(jax.random.normal(ks[0], (B, T, Hk, dk), jnp.float32))
    k = unit(jax.random.normal(ks[1], (B, T, Hk, dk), jnp.float32))
    v = jax.random.normal(ks[2], (B, T, Hk * G, dv), jnp.float32).astype(dtype)
    # Decays as the model makes them: g = -exp(A_log) softplus(a + dt_bias), mostly small.
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hk * G)) - 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hk * G)))
    s0 = jax.random.normal(ks[5], (B, Hk * G, dk, dv), jnp.float32) * 0.1 if with_state else None
    return q, k, v, g, beta, s0


def gdn_ref_fp32(q, k, v, g, beta, s0):
    up = lambda x: None if x is None else x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        return jax.jit(gdn_ref.chunk_gated_delta_rule)(up(q), up(k), up(v), g, beta, s0)


# ------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------
GDN_CASES = [  # (B, T, Hk, G, dk, dv, dtype, initial state)
    (2, 1000, 2, 2, 128, 128, jnp.float32, True),
    (1, 4096, 16, 2, 128, 128, jnp.bfloat16, False),
    (1, 4096, 16, 4, 128, 128, jnp.bfloat16, True),
    (1, 777, 4, 2, 128, 256, jnp.float32, True),  # `sequence` strategy: dv = 2 dk
    (1, 2048, 2, 2, 128, 256, jnp.bfloat16, True),
]


def section_checkgdn(args, cases=(0, 1, 2, 4)):
    """The GDN part of `check` on a subset of cases (a quick re-check after a kernel change): the bf16 ones
    (the fused default) and one fp32 case (the three stages)."""
    _check_gdn([GDN_CASES[i] for i in cases])


def _check_gdn(cases):
    gdn = jax.jit(lambda *a: gdn_api.gated_delta_rule(*a, kernels="gpu"))
    for i, (B, T, Hk, G, dk, dv, dt, st) in enumerate(cases):
        t0 = time.time()
        args_ = gdn_inputs(100 + i, B, T, Hk, G, dk, dv, dt, st)
        o, s = gdn(*args_)
        o_r, s_r = gdn_ref_fp32(*args_)
        tol = 1e-4 if dt == jnp.float32 else 1e-2
        tag = f"gdn B{B} T{T} Hk{Hk} Hv{Hk * G} dk{dk} dv{dv} {jnp.dtype(dt).name}{' +S0' if st else ''}"
        check(tag + " o", rel(o, o_r), tol)
        check(tag + " final state", rel(s, s_r), tol)
        log(f"    ({time.time() - t0:.0f} s incl. compile)")


def section_check(args):
    log("== check: GPU kernels vs fp32 jnp references")
    _check_gdn(GDN_CASES)

    # Attention: every path of the wrapper, bf16, hd 256, GQA 8:2, vs the fp32 reference.
    B, T, Hq, Hkv, D = 1, 1024, 8, 2, 256
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jax.random.normal(ks[0], (B, T, Hq, D), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, Hkv, D), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, Hkv, D), jnp.float32).astype(jnp.bfloat16)
    ar = lambda a, n=T: jnp.arange(a, a + n, dtype=jnp.int32)[None]
    padded = jnp.concatenate([ar(2 * T, T - 200), -jnp.ones((1, 200), jnp.int32)], axis=1)
    shuffled = jnp.asarray(np.random.default_rng(1).permutation(T).astype(np.int32))[None]
    layouts = [  # (name, q_pos, k_pos, causal)
        ("diagonal", ar(T), ar(T), True),
        ("unmasked", ar(T), ar(0), False),
        ("earlier keys, causal", ar(T), ar(0), True),
        ("later keys (empty)", ar(0), ar(T), True),
        ("padded keys, causal", ar(2 * T + 300), padded, True),
        ("padded keys, non-causal", ar(0), padded, False),
        ("offset diagonal", ar(T // 2), ar(0), True),
        ("shuffled keys (dense)", ar(0), shuffled, True),
    ]
    up = lambda x: x.astype(jnp.float32)
    # One jit per causal flag: every layout has the same shapes, so each compiles once.
    att = {c: jax.jit(lambda *a, c=c: att_api.attention_block(*a, causal=c, kernels="gpu")) for c in (False, True)}
    for name, qp, kp, causal in layouts:
        out, lse = att[causal](q, k, v, qp, kp)
        with jax.default_matmul_precision("highest"):
            o_r, l_r = att_ref.attention_block(up(q), up(k), up(v), qp, kp, causal=causal)
        empty = ~jnp.isfinite(l_r)  # [B, Hq, T]: rows that see no key
        out_rows = jnp.abs(out).max(-1).swapaxes(1, 2)  # [B, Hq, T]
        lse_ok = bool(jnp.all(jnp.isfinite(lse) == ~empty)) and float(jnp.max(jnp.where(empty, out_rows, 0.0))) == 0.0
        lse_err = float(jnp.max(jnp.where(empty, 0.0, jnp.abs(lse - l_r))))
        err = float(jnp.abs(out).max()) if bool(jnp.all(empty)) else rel(out, o_r)
        check(f"attn {name} out", err, 1e-2)
        check(f"attn {name} lse (max abs err; -inf rows match: {lse_ok})", lse_err if lse_ok else float("inf"), 1e-2)
    for p in ("plain", "causal", "range", "dense"):  # forced paths on the diagonal step
        if p == "plain":
            continue
        out, lse = jax.jit(lambda *a, p=p: att_gpu.attention_block(*a, causal=True, path=p))(q, k, v, ar(T), ar(T))
        with jax.default_matmul_precision("highest"):
            o_r, l_r = att_ref.attention_block(up(q), up(k), up(v), ar(T), ar(T), causal=True)
        check(f"attn diagonal forced path={p} out", rel(out, o_r), 1e-2)

    # Grouped matmul: 64 experts, some empty, rows past the routed ones must come back 0.
    M, K, N, E = 4096, 512, 384, 64
    ks = jax.random.split(jax.random.PRNGKey(9), 3)
    lhs = jax.random.normal(ks[0], (M, K), jnp.float32).astype(jnp.bfloat16)
    rhs = (jax.random.normal(ks[1], (E, K, N), jnp.float32) * K**-0.5).astype(jnp.bfloat16)
    sizes = jax.random.multinomial(ks[2], M - 300, jnp.full((E,), 1.0 / E)).astype(jnp.int32)
    sizes = sizes.at[3].set(0).at[4].add(sizes[3])
    out = jax.jit(lambda *a: moe_api.grouped_matmul(*a, kernels="gpu"))(lhs, rhs, sizes)
    with jax.default_matmul_precision("highest"):
        ref = moe_ref.grouped_matmul(up(lhs), up(rhs), sizes)
    check("moe grouped_matmul bf16 (tokamax mosaic)", rel(out, ref), 1e-2)
    check("moe grouped_matmul unrouted rows are 0", float(jnp.abs(out[M - 300:].astype(jnp.float32)).max()), 0.0)
    section_checkdecode(args)


def section_checkdecode(args):
    """The Pallas decode attention on the stacked cache (kernels/attention/decode_pallas.py) against the
    fp32 slice-and-softmax reference: bf16 and fp32 caches, a layer inside the stack, empty slots past
    `used`, a row with a hole; the 9B's head shapes (hd 256, 16 q / 4 kv heads)."""
    from pcp_jax.kernels.attention import decode_pallas
    N, B, S, Hkv, D, Hq = 4, 2, 4096, 4, 256, 16
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    k = jax.random.normal(ks[0], (N, B, S, Hkv, D), jnp.float32)
    v = jax.random.normal(ks[1], (N, B, S, Hkv, D), jnp.float32)
    q = jax.random.normal(ks[2], (B, 1, Hq, D), jnp.float32)
    used = 3000
    kpos = jnp.where(jnp.arange(S)[None] < used, jnp.arange(S)[None], -1).repeat(B, 0).astype(jnp.int32)
    kpos = kpos.at[1, 100:300].set(-1)
    q_pos = jnp.array([[used - 1], [2000]], jnp.int32)
    with jax.default_matmul_precision("highest"):  # not TF32 on the GPU
        want, want_lse = decode_pallas.reference(q, k, v, 2, q_pos, kpos)
    for dt, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)):
        f = jax.jit(lambda *a: decode_pallas.stacked_decode_attention(*a, used=used))
        out, lse = f(q.astype(dt), k.astype(dt), v.astype(dt), 2, q_pos, kpos)
        check(f"decode attention stacked {jnp.dtype(dt).name} out", rel(out, want), tol)
        check(f"decode attention stacked {jnp.dtype(dt).name} lse", rel(lse, want_lse), tol)


# ------------------------------------------------------------------------------------------------
# gdn
# ------------------------------------------------------------------------------------------------
def _fla_fn(q, k, v, g, beta):
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdr

    t = lambda x: torch.utils.dlpack.from_dlpack(x)
    tq, tk, tv, tg, tb = map(t, (q, k, v, g, beta))

    def run():
        return fla_gdr(tq, tk, tv, tg, tb, output_final_state=True)

    return run


def _torch_time(run):
    import triton.testing

    run()
    return triton.testing.do_bench(run, warmup=100, rep=500, return_mode="median")


def _profile_gdn(args, ours, q, k, v, g, beta):
    """Logs the kernel tables of 3 traced calls of ours and 3 of FLA's on these inputs (under --profile); ours
    only, saying why, when FLA does not run. Returns nothing; a failure is logged and kept in RESULTS."""
    T, Hv = args.profile_case
    try:
        log(profile_calls(f"ours T={T} Hv={Hv}", os.path.join(args.profile, f"gdn_ours_T{T}_Hv{Hv}"),
                          lambda: ours(q, k, v, g, beta)))
    except Exception as e:  # a failed profile must not hide the timings that follow
        RESULTS["errors"].append(f"profile ours T{T} Hv{Hv}: {e!r}")
        log(f"  profile of ours failed: {e!r}")
    try:
        import torch

        run = _fla_fn(q, k, v, g, beta)

        def fla():
            run()
            torch.cuda.synchronize()

        log(profile_calls(f"FLA chunk_gated_delta_rule T={T} Hv={Hv}",
                          os.path.join(args.profile, f"gdn_fla_T{T}_Hv{Hv}"), fla))
    except Exception as e:  # FLA missing or failing: ours is profiled alone
        RESULTS["errors"].append(f"profile FLA T{T} Hv{Hv}: {e!r}")
        log(f"  FLA not profiled (ours only): {e!r}")


def section_gdn(args):
    log("== gdn: ours (Pallas, Triton lowering) vs FLA chunk_gated_delta_rule, bf16, B=1, Hk=16, dk=dv=128")
    ours = jax.jit(lambda q, k, v, g, b: pallas_gpu.chunk_gated_delta_rule(q, k, v, g, b))
    if args.profile and (args.profile_case[0] not in args.gdn_T or args.profile_case[1] not in (32, 64)):
        log(f"  --profile-case {args.profile_case} is not among --gdn-T {args.gdn_T} x Hv (32, 64): no profile")
    for T in args.gdn_T:
        for Hv in (32, 64):
            q, k, v, g, beta, _ = gdn_inputs(T + Hv, 1, T, 16, Hv // 16, 128, 128, jnp.bfloat16, False)
            ms, spread = bench(ours, q, k, v, g, beta, reps=9)
            fla_ms = float("nan")
            try:
                run = _fla_fn(q, k, v, g, beta)
                if T == args.gdn_T[0]:  # cross-check FLA against ours once per head count
                    import torch

                    o_f, s_f = run()
                    o, s = ours(q, k, v, g, beta)
                    o_f = jnp.asarray(o_f.float().cpu().numpy())
                    check(f"gdn ours vs FLA T{T} Hv{Hv} o", rel(o, o_f), 2e-2)
                    del o_f, s_f
                    torch.cuda.empty_cache()
                fla_ms = _torch_time(run)
                del run
            except Exception as e:  # FLA missing or failing must not hide our numbers
                RESULTS["errors"].append(f"FLA T{T} Hv{Hv}: {e!r}")
                log(f"  FLA failed: {e!r}")
            row("gdn", f"T={T} Hv={Hv} ours", ms, spread_ms=f"{spread[0]:.3f}-{spread[1]:.3f}",
                fla_ms=fla_ms, speedup_vs_fla=fla_ms / ms)
            if args.profile and (T, Hv) == args.profile_case:
                _profile_gdn(args, ours, q, k, v, g, beta)
            del q, k, v, g, beta


def section_tune(args):
    log("== tune: GDN tilings and stage times at T=32k, Hv=32")
    T, Hv = 32768, 32
    q, k, v, g, beta, _ = gdn_inputs(5, 1, T, 16, Hv // 16, 128, 128, jnp.bfloat16, False)
    variants = [
        pallas_gpu.Tiling(),
        pallas_gpu.Tiling(bv_state=64),
        pallas_gpu.Tiling(warps_state=8, bv_state=64),
        pallas_gpu.Tiling(stages_state=3),
        pallas_gpu.Tiling(stages_state=1),
        pallas_gpu.Tiling(warps_state=2),
        pallas_gpu.Tiling(bv_out=128, warps_out=8),
        pallas_gpu.Tiling(warps_wy=8),
    ]
    for t in variants:
        try:
            f = jax.jit(lambda *a, t=t: pallas_gpu.chunk_gated_delta_rule(*a, tiling=t))
            ms, _ = bench(f, q, k, v, g, beta, reps=7)
            row("tune", repr(t).replace("Tiling", ""), ms)
        except Exception as e:
            RESULTS["errors"].append(f"tune {t}: {e!r}")
            log(f"  {t} failed: {e!r}")
    # Stage times with the default tiling.
    t = pallas_gpu.Tiling()
    L, B, N = pallas_gpu.CHUNK, 1, T // pallas_gpu.CHUNK
    gc = jnp.cumsum(g.reshape(B, N, L, Hv), axis=2).reshape(B, T, Hv).transpose(0, 2, 1)
    bt = beta.transpose(0, 2, 1)
    prec = jax.lax.Precision.DEFAULT
    wy = jax.jit(lambda k, v, gc, bt: pallas_gpu._wy(k, v, gc, bt, 2, cdt=jnp.bfloat16, prec=prec,
                                                      tiling=t, interpret=False))
    w, u = wy(k, v, gc, bt)
    s0 = jnp.zeros((B, Hv, 128, 128), jnp.float32)
    st = jax.jit(lambda w, u, k, gc, s0: pallas_gpu._state_pass(w, u, k, gc, s0, 2, prec=prec, tiling=t,
                                                                 interpret=False))
    h, vn, _ = st(w, u, k, gc, s0)
    out = jax.jit(lambda q, k, gc, h, vn: pallas_gpu._outputs(q, k, gc, h, vn, 2, jnp.bfloat16, scale=128**-0.5,
                                                              prec=prec, tiling=t, interpret=False))
    row("tune", "stage 1 wy (kkT, inverse, w, u)", bench(wy, k, v, gc, bt, reps=7)[0])
    row("tune", "stage 2 state pass", bench(st, w, u, k, gc, s0, reps=7)[0])
    row("tune", "stage 3 outputs", bench(out, q, k, gc, h, vn, reps=7)[0])


# (column name, Tiling fields, other dv block). Priority order: under the time budget the later ones are
# the first to go. "out"/"all": fuse="output"/"all"; wN: warps_state=N; bvN: bv_state=N; sN: stages_fused=N,
# none given: `_fused_stages` picks (3 in bf16 at dk = 128); bv*: the dv block that the launch-size rule does
# not pick (64 at Hv 32, 32 at Hv 64). The blocked inverse alone measured slower (H200, 32k / 32 heads: 2.204
# ms vs 2.080). Run K7's results for the others: docs/runs/2026-11-30-gdnvar5.txt.
GDNVAR = [
    ("base", dict(fuse="none"), False),  # the three stages (the default before run K5)
    ("out", dict(fuse="output"), False),
    ("all", dict(fuse="all"), False),
    # The fused pass is latency-bound (docs/gpu_notes.md): narrower dv blocks give each SM two programs to
    # interleave at 32 heads, more warps split each dependent dot of a chunk step. Run K14: both slower
    # (0.59-0.89x FLA against 1.02-1.16x for "all"; docs/runs/2026-11-30-gdnvar-k14.txt).
    ("all bv16", dict(fuse="all", bv_state=16), False),
    ("all w8", dict(fuse="all", warps_state=8), False),
    ("out s2", dict(fuse="output", stages_fused=2), False),
    ("all s2", dict(fuse="all", stages_fused=2), False),
    ("all s1", dict(fuse="all", stages_fused=1), False),
    ("out s1", dict(fuse="output", stages_fused=1), False),
    ("all bv*", dict(fuse="all"), True),
    ("out bv*", dict(fuse="output"), True),
    ("all s2 bv*", dict(fuse="all", stages_fused=2), True),
    ("all+blk", dict(fuse="all", inverse="blocked"), False),
]
GDNVAR_CHECKS = [(2, 1000, 2, 2, 128, 128, jnp.float32, True), (1, 4096, 16, 4, 128, 128, jnp.bfloat16, True)]
# Checked against the fp32 reference before timing: in fp32 only base (the fused forms' fp32 Triton compiles
# took over 100 s each on the H200, run K4; they are checked in fp32 in interpret mode by
# tests/test_gdn_variants.py), in bf16 base and the two fused forms; every other variant against base.
GDNVAR_CHECKED = {jnp.float32: ("base",), jnp.bfloat16: ("base", "out", "all")}
GDNVAR_BUDGET_S = 330  # no later T starts after this; the stage in scripts/gpu_kernels_run.sh allows 420 s
GDNVAR_SCREEN_S = 120  # screening at the first T, counted from its FLA timings (checks ~80 s, FLA's autotuning
#                        ~100 s on the H200, run K5): no new variant is compiled after this
GDNVAR_FINALISTS = 2  # fused variants timed beside base at the later T


def _gdnvar_tiling(kw, other_bv, Hv):
    """(Tiling, effective launch key) at B = 1, dv = 128: the key names what the kernels run with, so that
    two names for one program (bv* at the auto block, s3 = auto) are compiled and timed once."""
    auto = pallas_gpu._auto_bv_state(1, Hv, 128)
    bv = kw.get("bv_state") or ((96 - auto) if other_bv else auto)  # 32 <-> 64
    t = pallas_gpu.Tiling(**{**kw, "bv_state": bv})
    stages = t.stages_state
    if t.fuse != "none":
        stages = pallas_gpu._fused_stages(t, from_t=t.fuse == "all", dk=128, bv=bv, itemsize=2)
    return t, (t.fuse, t.inverse, bv, stages, t.warps_state, t.warps_wy, t.warps_out, t.bv_out)


def _gdnvar_table(title, names, table):
    log(f"\n  gdnvar {title}: ms (FLA ms / ours ms); '-' not run (budget, or same program as a column "
        "to its left at that size: then that figure is shown), 'x' failed or wrong")
    log("  " + f"{'T':>7s} {'Hv':>3s} {'FLA':>7s} | " + " | ".join(f"{n:>15s}" for n in names))
    for T, Hv, fla_ms, times in table:
        cells = []
        for n in names:
            t = times.get(n)
            cells.append(f"{t:7.3f} ({fla_ms / t:4.2f}x)" if isinstance(t, float) else f"{t or '-':>15s}")
        log("  " + f"{T:7d} {Hv:3d} {fla_ms:7.3f} | " + " | ".join(cells))


def section_gdnvar(args):
    """GDNVAR_CHECKED against the fp32 reference; then at
    the first T every variant of GDNVAR in order while GDNVAR_SCREEN_S lasts, each checked against base on
    the timed inputs (rel L2 <= 1e-2) before it is timed; at the later T base and the GDNVAR_FINALISTS
    fastest fused variants. Tables print whatever ran, also after a failure."""
    t_start = time.time()
    elapsed = lambda: time.time() - t_start
    log("== gdnvar: GDN variants vs FLA (bf16, B=1, Hk=16, dk=dv=128); checked against fp32 / base first")
    names = [n for n, _, _ in GDNVAR]
    spec = {n: (kw, alt) for n, kw, alt in GDNVAR}
    table, screen = [], []
    try:
        for i, (B, T, Hk, G, dk, dv, dt, st) in enumerate(GDNVAR_CHECKS):
            a = gdn_inputs(200 + i, B, T, Hk, G, dk, dv, dt, st)
            o_r, s_r = gdn_ref_fp32(*a)
            tag, tol = f"B{B} T{T} Hv{Hk * G} {jnp.dtype(dt).name}", 1e-4 if dt == jnp.float32 else 1e-2
            for name in [n for n in GDNVAR_CHECKED[dt] if n in spec]:
                t = pallas_gpu.Tiling(**spec[name][0])
                try:
                    o, s = jax.jit(lambda *a, t=t: pallas_gpu.chunk_gated_delta_rule(*a, tiling=t))(*a)
                    check(f"gdnvar {name} {tag} o", rel(o, o_r), tol)
                    check(f"gdnvar {name} {tag} final state", rel(s, s_r), tol)
                except Exception as e:
                    RESULTS["errors"].append(f"gdnvar {name} check {tag}: {e!r}")
                    log(f"  {name} {tag} failed: {e!r}")
            del a, o_r, s_r
        log(f"  (checks done at {elapsed():.0f} s)")
        for ti, T in enumerate(args.gdn_T):
            if ti and elapsed() > GDNVAR_BUDGET_S:
                log(f"  T={T}: skipped (budget {GDNVAR_BUDGET_S} s)")
                continue
            if ti:
                fused = sorted((v for v in screen if v[0] != "base"), key=lambda v: v[1])
                run_names = ["base"] + [n for n, _ in fused[:GDNVAR_FINALISTS]]
            else:
                run_names = names
            sizes = []  # per head count: inputs, base outputs, launch keys done
            for Hv in (32, 64):
                inp = gdn_inputs(T + Hv, 1, T, 16, Hv // 16, 128, 128, jnp.bfloat16, False)[:5]
                try:
                    fla_ms = _torch_time(_fla_fn(*inp))
                except Exception as e:
                    RESULTS["errors"].append(f"gdnvar FLA T{T} Hv{Hv}: {e!r}")
                    log(f"  FLA failed: {e!r}")
                    fla_ms = float("nan")
                row("gdnvr", f"T={T} Hv={Hv} FLA", fla_ms, at_s=round(elapsed()))
                times = {}
                table.append((T, Hv, fla_ms, times))
                sizes.append(dict(Hv=Hv, inp=inp, fla_ms=fla_ms, times=times, base=None, done={}))
            screen_end = elapsed() + GDNVAR_SCREEN_S
            for name in run_names:
                if not ti and name != "base" and elapsed() > screen_end:
                    log(f"  T={T} {name}: skipped (screening budget {GDNVAR_SCREEN_S} s)")
                    continue
                for z in sizes:
                    Hv, times = z["Hv"], z["times"]
                    try:
                        t, key = _gdnvar_tiling(*spec[name], Hv)
                    except ValueError as e:
                        RESULTS["errors"].append(f"gdnvar {name}: {e!r}")
                        log(f"  {name}: {e!r}")
                        times[name] = "x"
                        continue
                    if key in z["done"]:  # the same program as an earlier column
                        times[name] = times.get(z["done"][key])
                        continue
                    z["done"][key] = name
                    f = jax.jit(lambda *a, t=t: pallas_gpu.chunk_gated_delta_rule(*a, tiling=t))
                    try:
                        o, s = f(*z["inp"])
                        if z["base"] is None:
                            z["base"] = (o, s)  # base: checked against fp32 above
                        else:
                            o_b, s_b = z["base"]
                            ok = check(f"gdnvar {name} T{T} Hv{Hv} o vs base", rel(o, o_b), 1e-2)
                            ok &= check(f"gdnvar {name} T{T} Hv{Hv} final state vs base", rel(s, s_b), 1e-2)
                            if not ok:
                                times[name] = "x"
                                continue
                        del o, s
                        times[name] = bench(f, *z["inp"], reps=5)[0]
                    except Exception as e:
                        RESULTS["errors"].append(f"gdnvar {name} T{T} Hv{Hv}: {e!r}")
                        log(f"  {name} T{T} Hv{Hv} failed: {str(e)[:300]!r}")
                        times[name] = "x"
                        continue
                    row("gdnvr", f"T={T} Hv={Hv} {name}", times[name], speedup_vs_fla=z["fla_ms"] / times[name],
                        bv=key[2], stages=key[3], at_s=round(elapsed()))
            del sizes
            if not ti:  # variants by their mean time relative to base over the head counts
                base = [tm["base"] for _, _, _, tm in table if isinstance(tm.get("base"), float)]
                for n in names:
                    got = [tm[n] for _, _, _, tm in table if isinstance(tm.get(n), float)]
                    if base and len(got) == len(base):
                        screen.append((n, statistics.mean(x / b for x, b in zip(got, base))))
                _gdnvar_table(f"T={T}", names, table)
                log(f"  time / base at T={T}: " + ", ".join(f"{n} {r:.3f}" for n, r in screen))
    finally:
        _gdnvar_table("all sizes", names, table)
        log(f"  (gdnvar {elapsed():.0f} s)")


def section_tune64(args):
    """The 64-value-head gap: dv block of the state pass (each dv block re-reads w and k)."""
    log("== tune64: GDN state-pass dv block at Hv=64 (B=1, Hk=16, dk=dv=128, bf16)")
    for T in (32768, 131072):
        q, k, v, g, beta, _ = gdn_inputs(T + 64, 1, T, 16, 4, 128, 128, jnp.bfloat16, False)
        for t in (pallas_gpu.Tiling(), pallas_gpu.Tiling(bv_state=64)):
            f = jax.jit(lambda *a, t=t: pallas_gpu.chunk_gated_delta_rule(*a, tiling=t))
            row("tune", f"T={T} Hv=64 bv_state={t.bv_state}", bench(f, q, k, v, g, beta, reps=7)[0])
        del q, k, v, g, beta


# ------------------------------------------------------------------------------------------------
# attn
# ------------------------------------------------------------------------------------------------
def section_attn(args):
    log("== attn: ring step, hd 256, 32 q / 2 kv heads, bf16 (TFLOP/s: causal counts half the square)")
    Hq, Hkv, D = 32, 2, 256
    for T in (4096, 16384):
        ks = jax.random.split(jax.random.PRNGKey(T), 3)
        q = jax.random.normal(ks[0], (1, T, Hq, D), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, T, Hkv, D), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, T, Hkv, D), jnp.bfloat16)
        pos = jnp.arange(T, dtype=jnp.int32)[None]
        full = 4.0 * T * T * Hq * D
        cudnn_u = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        cudnn_c = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        cu_u = bench(cudnn_u, q, k, v)[0]
        cu_c = bench(cudnn_c, q, k, v)[0]
        row("attn", f"T={T} unmasked cuDNN", cu_u, tflops=full / cu_u / 1e9)
        row("attn", f"T={T} diagonal cuDNN causal", cu_c, tflops=full / 2 / cu_c / 1e9)
        # "auto" (the api's run-time choice) compiles every branch of its lax.switch: checked in `check`,
        # not timed here to keep the run short; it runs the branch timed below plus O(T log T) predicates.
        cases = [("unmasked", False, pos + T, "plain"), ("diagonal", True, pos, "causal"),
                 ("diagonal", True, pos, "range")]
        if T == 4096:
            cases.append(("diagonal", True, pos, "dense"))
        for kind, causal, qp, path in cases:
            f = jax.jit(lambda q, k, v, qp, kp, c=causal, p=path: att_gpu.attention_block(q, k, v, qp, kp, causal=c, path=p))
            try:
                ms = bench(f, q, k, v, qp, pos)[0]
            except Exception as e:
                RESULTS["errors"].append(f"attn T{T} {kind} {path}: {e!r}")
                log(f"  attn {kind} {path} failed: {e!r}")
                continue
            flops = full if kind == "unmasked" else full / 2
            base = cu_u if kind == "unmasked" else cu_c
            row("attn", f"T={T} {kind} tokamax path={path}", ms, tflops=flops / ms / 1e9, vs_cudnn=base / ms)


# ------------------------------------------------------------------------------------------------
# moe
# ------------------------------------------------------------------------------------------------
def moe_layer_parts(hidden=4096, experts=512, top_k=10, inter=1024):
    def router(x, wr):
        logits = jnp.dot(x, wr, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        w, e = jax.lax.top_k(probs, top_k)
        return w / jnp.sum(w, axis=-1, keepdims=True), e.astype(jnp.int32)

    def dispatch(x, e):
        flat = e.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
        xs = jnp.take(x, order // top_k, axis=0)
        return xs, order, sizes

    def gate_up(xs, w_gu, sizes):
        h = moe_api.grouped_matmul(xs, w_gu, sizes, kernels="gpu")
        gt, up = jnp.split(h, 2, axis=-1)
        return (jax.nn.silu(gt.astype(jnp.float32)) * up.astype(jnp.float32)).astype(xs.dtype)

    def down(h, w_d, sizes):
        return moe_api.grouped_matmul(h, w_d, sizes, kernels="gpu")

    def combine(y, order, w, T):
        wflat = w.reshape(-1)[order]
        return jnp.zeros((T, y.shape[-1]), jnp.float32).at[order // top_k].add(
            y.astype(jnp.float32) * wflat[:, None]).astype(y.dtype)

    return router, dispatch, gate_up, down, combine


def section_moe(args):
    log("== moe: 397B-shape layer, hidden 4096, 512 experts, top-10, expert width 1024, bf16")
    H, E, K, I = 4096, 512, 10, 1024
    router, dispatch, gate_up, down, combine = moe_layer_parts(H, E, K, I)
    kw = jax.random.split(jax.random.PRNGKey(3), 3)
    wr = (jax.random.normal(kw[0], (H, E), jnp.float32) * H**-0.5).astype(jnp.bfloat16)
    w_gu = jax.random.normal(kw[1], (E, H, 2 * I), jnp.bfloat16) * jnp.bfloat16(H**-0.5)
    w_d = jax.random.normal(kw[2], (E, I, H), jnp.bfloat16) * jnp.bfloat16(I**-0.5)
    for T in (8192, 32768):
        x = jax.random.normal(jax.random.PRNGKey(T), (T, H), jnp.bfloat16)
        M = T * K
        jr, jd = jax.jit(router), jax.jit(dispatch)
        jg, jdn = jax.jit(gate_up), jax.jit(down)
        jc = jax.jit(combine, static_argnums=3)
        w, e = jr(x, wr)
        xs, order, sizes = jd(x, e)
        h = jg(xs, w_gu, sizes)
        y = jdn(h, w_d, sizes)

        def layer(x, wr, w_gu, w_d):
            w, e = router(x, wr)
            xs, order, sizes = dispatch(x, e)
            return combine(down(gate_up(xs, w_gu, sizes), w_d, sizes), order, w, x.shape[0])

        f_gu, f_d = 2.0 * M * H * 2 * I, 2.0 * M * I * H
        f_router = 2.0 * T * H * E
        t_r = bench(jr, x, wr)[0]
        t_d = bench(jd, x, e)[0]
        t_g = bench(jg, xs, w_gu, sizes)[0]
        t_dn = bench(jdn, h, w_d, sizes)[0]
        t_c = bench(jc, y, order, w, T)[0]
        t_l = bench(jax.jit(layer), x, wr, w_gu, w_d)[0]
        pk = lambda f, ms: dict(tflops=f / ms / 1e9, of_peak=f / ms / 1e9 / PEAK_TFLOPS)
        row("moe", f"T={T} router (matmul+softmax+top10)", t_r, **pk(f_router, t_r))
        row("moe", f"T={T} sort/dispatch", t_d)
        row("moe", f"T={T} gate/up ragged_dot [{M}x{H}]x[{H}x{2 * I}]", t_g, **pk(f_gu, t_g))
        row("moe", f"T={T} down ragged_dot [{M}x{I}]x[{I}x{H}]", t_dn, **pk(f_d, t_dn))
        row("moe", f"T={T} combine (weighted scatter-add)", t_c)
        row("moe", f"T={T} whole layer (one jit)", t_l, **pk(f_gu + f_d + f_router, t_l))
        del x, xs, h, y


def _profile_case(text, gdn_T):
    """(T, Hv) of --profile-case "T:H"; (the largest of gdn_T, 64) when it is not given. ValueError otherwise."""
    if not text:
        return max(gdn_T), 64
    T, Hv = (int(x) for x in text.split(":"))
    return T, Hv


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--sections", default="check,gdn,tune,attn,moe")
    ap.add_argument("--gdn-T", default="8192,32768,131072")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", metavar="DIR", help="gdn section: trace --profile-case and print kernel tables")
    ap.add_argument("--profile-case", metavar="T:H", help="gdn case to trace (default: the largest --gdn-T, 64)")
    args = ap.parse_args()
    args.gdn_T = [int(t) for t in args.gdn_T.split(",")]
    try:
        args.profile_case = _profile_case(args.profile_case, args.gdn_T)
    except ValueError:
        ap.error(f"--profile-case {args.profile_case!r}: want T:H, e.g. 131072:64")
    dev = jax.devices()[0]
    RESULTS["meta"] = dict(device=dev.device_kind, jax=jax.__version__, date=datetime.date.today().isoformat(),
                           argv=sys.argv)
    log(f"device {dev.device_kind}, jax {jax.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    for s in args.sections.split(","):
        t0 = time.time()
        try:
            globals()[f"section_{s}"](args)
        except Exception as e:
            RESULTS["errors"].append(f"section {s}: {e!r}")
            log(f"section {s} FAILED:\n{traceback.format_exc()}")
        log(f"   ({s}: {time.time() - t0:.0f} s)")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    log("\n== summary")
    for c in RESULTS["checks"]:
        if not c["ok"]:
            log(f"  FAILED CHECK {c['name']}: {c['rel_err']:.2e} > {c['tol']:.0e}")
    log(f"  checks: {sum(c['ok'] for c in RESULTS['checks'])}/{len(RESULTS['checks'])} passed")
    for r in RESULTS["rows"]:
        ex = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                      if k not in ("section", "name", "ms"))
        log(f"  {r['section']:5s} {r['name']:44s} {r['ms']:9.3f} ms  {ex}")
    for e in RESULTS["errors"]:
        log(f"  ERROR {e[:300]}")


if __name__ == "__main__":
    main()

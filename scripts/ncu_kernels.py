"""One call of each kernel behind issue 17's missed goals, for Nsight Compute's hardware counters.

    ncu --profile-from-start off --clock-control none --csv --page details --section SpeedOfLight ... \\
        python scripts/ncu_kernels.py --cases moe:qwen3.5-397b-a17b:8192,gdn:32768:64,fla:32768:64
    python scripts/ncu_kernels.py --summarize ncu.csv        (a table per case from ncu's CSV)

Cases (comma-separated):
  moe:PRESET:T   our default MoE expert stages (kernels/moe/mosaic_gpu.py: grouped_swiglu, then grouped_matmul
                 for the down projection, each with its default_config) on T tokens routed by a
                 random softmax/top-k over the preset's experts (bf16, random weights);
  gdn:T:HV       our GDN chunked forward (kernels/gdn/pallas_gpu.py, default tiling) at B = 1, 16 qk heads,
                 HV value heads, dk = dv = 128, bf16;
  fla:T:HV       FLA's chunk_gated_delta_rule on the same inputs (torch through DLPack).
Each case runs once untraced (compiles; FLA autotunes), then once between cuProfilerStart and cuProfilerStop
(CUDA driver API through ctypes; the MoE stages each in their own pair), so that under `--profile-from-start
off` ncu profiles exactly one call's kernels, in order (under `--replay-mode range`, one range per stage).
The script prints a line per case before its profiled call (ncu's CSV goes to its own file with --log-file)
and, for the MoE case, the bytes a single read of the weights and activations moves, to set against the
DRAM bytes ncu counts.

--summarize reads the CSV that `ncu --csv --page details` wrote and prints, per kernel: duration, DRAM bytes
read and written, DRAM and SM throughput (% of peak), L2 hit rate, registers per thread, grid and block.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (FLA) shares the GPU


def profiled(fns) -> None:
    """Each of fns() once to warm up, then each once inside its own cuProfilerStart/Stop pair (one range per
    fn under `--replay-mode range`); every call waited for."""
    for fn in fns:
        fn()
    print("  warm calls done", flush=True)
    cuda = ctypes.CDLL("libcuda.so.1")
    for fn in fns:
        if cuda.cuProfilerStart() != 0:
            raise RuntimeError("cuProfilerStart failed")
        fn()
        cuda.cuProfilerStop()
    print("  profiled calls done", flush=True)


def moe_case(preset: str, T: int):
    """(title, fn) for our two default expert stages on T routed tokens of `preset`."""
    import jax
    import jax.numpy as jnp

    from pcp_jax.config import PRESETS
    from pcp_jax.kernels.moe import mosaic_gpu as mg

    from check_moe_kernel import routing

    cfg = PRESETS[preset]
    D, E, k, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    sizes = routing(ks[0], T, E, k)
    M = T * k
    x = jax.random.normal(ks[1], (M, D), jnp.bfloat16)
    wg, wu = (jax.random.normal(kk, (E, D, I), jnp.bfloat16) for kk in ks[2:4])
    wd = jax.random.normal(ks[4], (E, I, D), jnp.bfloat16)
    h = jax.random.normal(ks[5], (M, I), jnp.bfloat16)
    swiglu, down = jax.jit(mg.grouped_swiglu), jax.jit(mg.grouped_matmul)
    used = int((sizes > 0).sum())
    print(f"  moe {preset} T={T}: M={M} rows over {used} of {E} experts (mean {M / max(used, 1):.0f} rows); "
          f"one read of gate+up weights {used * D * 2 * I * 2 / 1e9:.2f} GB, of x {M * D * 2 / 1e9:.3f} GB; "
          f"of down weights {used * I * D * 2 / 1e9:.2f} GB, of h {M * I * 2 / 1e9:.3f} GB; "
          f"SwiGLU {4 * M * D * I / 1e12:.3f} TFLOP, down {2 * M * I * D / 1e12:.3f} TFLOP", flush=True)

    run = [lambda: jax.block_until_ready(swiglu(x, wg, wu, sizes)), lambda: jax.block_until_ready(down(h, wd, sizes))]
    return f"moe {preset} T={T} (swiglu {mg.default_config(M, E, True)}; down {mg.default_config(M, E, False)})", run


def gdn_inputs(T: int, Hv: int):
    """q, k, v, g, beta as bench_kernels.py's gdn section makes them for (T, Hv): B = 1, 16 qk heads, bf16."""
    import jax.numpy as jnp
    from bench_kernels import gdn_inputs as make

    return make(T + Hv, 1, T, 16, Hv // 16, 128, 128, jnp.bfloat16, False)[:5]


def gdn_case(T: int, Hv: int):
    import jax

    from pcp_jax.kernels.gdn import pallas_gpu

    args = gdn_inputs(T, Hv)
    f = jax.jit(lambda *a: pallas_gpu.chunk_gated_delta_rule(*a))
    return f"gdn ours T={T} Hv={Hv} ({pallas_gpu.Tiling()})", [lambda: jax.block_until_ready(f(*args))]


def fla_case(T: int, Hv: int):
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    tq, tk, tv, tg, tb = (torch.utils.dlpack.from_dlpack(a) for a in gdn_inputs(T, Hv))

    def run():
        chunk_gated_delta_rule(tq, tk, tv, tg, tb, output_final_state=True)
        torch.cuda.synchronize()

    return f"FLA chunk_gated_delta_rule T={T} Hv={Hv}", [run]


def make_case(spec: str):
    kind, *rest = spec.split(":")
    if kind == "moe" and len(rest) == 2:
        return moe_case(rest[0], int(rest[1]))
    if kind in ("gdn", "fla") and len(rest) == 2:
        return (gdn_case if kind == "gdn" else fla_case)(int(rest[0]), int(rest[1]))
    raise SystemExit(f"case {spec!r}: expected moe:PRESET:T, gdn:T:HV or fla:T:HV")


METRICS = [  # (column, ncu metric name or section metric label, scale)
    ("ms", "gpu__time_duration.sum", 1e-6),
    ("DRAM read GB", "dram__bytes_read.sum", 1e-9),
    ("DRAM write GB", "dram__bytes_write.sum", 1e-9),
    ("DRAM %", "DRAM Throughput", 1),
    ("SM %", "Compute (SM) Throughput", 1),
    ("L2 hit %", "L2 Hit Rate", 1),
    ("regs", "Registers Per Thread", 1),
    ("occupancy %", "Achieved Occupancy", 1),
]
UNIT_SCALE = {"ns": 1, "us": 1e3, "ms": 1e6, "nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
              "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}


def summarize(path: str) -> str:
    """A markdown table of METRICS per profiled kernel, in launch order, from `ncu --csv --page details`."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # skip ncu's ==PROF== lines and the script's prints
    kernels: dict[str, dict] = {}
    for r in csv.DictReader(lines):
        kern = kernels.setdefault(r["ID"], {"name": r["Kernel Name"], "grid": r.get("Grid Size", ""),
                                            "block": r.get("Block Size", "")})
        value = r["Metric Value"].replace(",", "")
        try:
            v = float(value) * UNIT_SCALE.get(r.get("Metric Unit", ""), 1)
        except ValueError:
            continue
        kern[r["Metric Name"]] = v
    head = "| # | kernel | grid | block | " + " | ".join(c for c, _, _ in METRICS) + " |"
    out = [head, "|" + "---|" * (4 + len(METRICS))]
    for i, (kid, k) in enumerate(sorted(kernels.items(), key=lambda kv: int(kv[0]))):
        cells = []
        for _, metric, scale in METRICS:
            v = k.get(metric)
            cells.append("-" if v is None else f"{v * scale:.3g}")
        out.append(f"| {i} | {k['name'][:60]} | {k['grid']} | {k['block']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="")
    ap.add_argument("--summarize", metavar="CSV")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    for spec in filter(None, args.cases.split(",")):
        try:
            title, fns = make_case(spec)
            print(f"== {title}: warm calls next", flush=True)
            profiled(fns)
        except Exception as e:  # one case failing (FLA absent, a kernel refusing) must not lose the others
            print(f"== {spec} failed: {e!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The MoE layer on one GPU at the 397B / 122B / 35B expert shapes: every grouped-matmul candidate checked
against fp32 first, then timed; then the whole layer as the model runs it, against transformers' MoE block.

Usage (GPU machine, from the repo root, after `source scripts/gpu_common.sh`):
    python scripts/bench_moe.py --out $OUT                  # 397B, 122B, 35B at 8k and 32k tokens
    python scripts/bench_moe.py --out $OUT --quick          # fewer configs
Options: --presets a,b,... (pcp_jax.config preset names, or D:E:k:I:Is for a custom shape), --tokens 8192,32768,
--budget-s S (default 240: after S seconds, remaining cases time only the finalists), --no-torch, --no-ours.

For each preset (shapes from pcp_jax.config: hidden D, experts E, top-k, expert width I, shared width Is) it
makes random bf16 weights once, and for each token count T random bf16 activations routed by the layer's own
router (fp32 softmax of random logits, top-k, renormalised), so M = T·k rows sorted by expert. Then:
 1. check  : every candidate of the two expert stages against an fp32 numpy reference on the rows of six
             experts of that routing (smallest, largest, first, last, two random; at most 1024 rows each):
             rel. L2 error, bf16 tolerance 1e-2. A failing candidate is not timed.
               gate/up stage  xs [M, D] -> h = silu(xs @ Wg[e]) * (xs @ Wu[e])  [M, I]
               down stage     h  [M, I] -> h @ Wd[e]                           [M, D]
             candidates: tokamax heuristic (what kernels/moe/api.py runs: gate and up as two calls, as the model
             has them; and gate|up as one call of width 2I), tokamax with explicit tile configs (tokamax_configs(),
             from its sm90 autotuning space plus block_k 64), ours (kernels/moe/mosaic_gpu.py: grouped_swiglu
             for gate/up over SWIGLU_SWEEP, grouped_matmul for down over SWEEP) when importable, and
             api.grouped_swiglu when kernels/moe/api.py has it. A tokamax 2I candidate's time includes the
             XLA swiglu that follows it.
 2. stages : median time, TFLOP/s and % of 799 counting only routed rows (2·M·D·2I and 2·M·I·D).
             The full sweep runs at a preset's first token count; later ones time the heuristics and the best
             two of each family (tokamax configs, ours).
 3. parts  : router, dispatch (model: one key/value sort + gather; before: argsort + bincount + gather),
             combine (model: combine_experts, a gather with fp32 sum; before: bf16 scatter-add; and k separate
             row gathers summed, an alternative form).
 4. layer  : router + dispatch + experts + combine + shared expert, one jit:
               model   : pcp_jax.model.MoE.__call__ with kernels="gpu" (the code of this commit),
               before  : the previous code (argsort/bincount, bf16 scatter-add, tokamax heuristic),
               best    : the model's route/dispatch/combine with the fastest passing candidate of each stage,
             and transformers' Qwen3_5MoeSparseMoeBlock (qwen3_5_moe, experts_implementation="grouped_mm", bf16,
             the same weights copied into its layout) timed with CUDA events; its output is checked against ours
             on the tokens both route to the same top-k set (rel. L2 <= 2e-2: both bf16, different roundings;
             at least 80% of tokens routed alike). Layer FLOPs: router 2·T·D·E + experts 2·T·k·3·D·I
             + shared 2·T·(3·D·Is + D).
Order within a case: parts, the model/before layers and transformers first, then the checks and sweeps, then
the best layer (a candidate kernel that breaks the GPU context cannot take the baseline rows with it).
Timings: warm-up (compile + 1 run), then 5 samples of back-to-back calls (about 30 ms each) closed by
block_until_ready; the figure is the median sample / calls. Writes results.json under --out after every case.
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

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch (transformers) shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pcp_jax.config import ModelConfig, preset  # noqa: E402
from pcp_jax.kernels.moe import api as moe_api  # noqa: E402
from pcp_jax.kernels.moe import reference as moe_ref  # noqa: E402
from pcp_jax.model import MoE, combine_experts, sort_by_expert  # noqa: E402
from pcp_jax.parallel.context import ShardContext  # noqa: E402
import burst_timing  # noqa: E402  (scripts/ is on sys.path when a script runs)

try:
    from pcp_jax.kernels.moe import mosaic_gpu as ours
except Exception as e:  # noqa: BLE001 - the lead's kernel may be missing or mid-edit: bench the rest
    ours, OURS_MISSING = None, repr(e)

PEAK_TFLOPS = 799.0  # bf16 8192^3 matmul measured on this workplace's H200
TOL = 1e-2
TORCH_TOL = 2e-2  # transformers vs ours on tokens routed alike: bf16 both, different roundings
DEFAULT_PRESETS = "qwen3.5-397b-a17b,qwen3.5-122b-a10b,qwen3.5-35b-a3b"
RESULTS: dict = {"checks": [], "stages": [], "parts": [], "layers": [], "errors": []}
T0 = time.time()


def log(*a):
    print(*a, flush=True)


def save(out_dir):
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def bench(fn, *args):
    """Median ms per call of fn(*args): scripts/burst_timing.py, 5 bursts of about 30 ms."""
    return burst_timing.bench(fn, *args, reps=5, target_s=0.03)[0]


# ------------------------------------------------------------------------------------------------
# Shapes and weights
# ------------------------------------------------------------------------------------------------
def shape_of(spec: str) -> tuple[str, ModelConfig]:
    if ":" in spec:  # D:E:k:I:Is
        D, E, k, I, Is = (int(v) for v in spec.split(":"))
        base = preset("qwen3.5-35b-a3b")
        import dataclasses
        return spec, dataclasses.replace(base, hidden_size=D, num_experts=E, num_experts_per_tok=k,
                                         moe_intermediate_size=I, shared_expert_intermediate_size=Is)
    return spec, preset(spec)


def random_params(cfg: ModelConfig, seed=0):
    """The MoE layer's flat parameters ("moe.<leaf>"), random bf16 on the device, scaled like a trained layer
    (unit-variance activations stay O(1))."""
    D, E, I, Is = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    shapes = {"router": ((D, E), D), "gate_proj": ((E, D, I), D), "up_proj": ((E, D, I), D),
              "down_proj": ((E, I, D), I)}
    if Is:
        shapes |= {"shared.gate_proj": ((D, Is), D), "shared.up_proj": ((D, Is), D),
                   "shared.down_proj": ((Is, D), Is), "shared_gate": ((D, 1), D)}
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {f"moe.{n}": jax.random.normal(key, s, jnp.bfloat16) * jnp.bfloat16(fan_in ** -0.5)
            for key, (n, (s, fan_in)) in zip(keys, shapes.items())}


def gpu_ctx():
    zeros = jnp.zeros((1, 1), jnp.int32)
    return ShardContext("cp", 1, "sequence", "gpu", 0, zeros, jnp.ones((1,), jnp.int32))


# ------------------------------------------------------------------------------------------------
# Candidates: each is (name, family, weights key, fn(lhs, ws, sizes)); ws = the weights tuple of its key
# ------------------------------------------------------------------------------------------------
def swiglu_xla(gu):
    g, u = jnp.split(gu, 2, axis=-1)
    return (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(gu.dtype)


def tokamax_configs(quick: bool):
    """Tile configs for tokamax's sm90 ragged_dot: its heuristic is 64x64x128, 2 stages, not persistent."""
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu as tk
    M_, N_ = tk.common.MatmulDimension.M, tk.common.MatmulDimension.N
    C = lambda bm, bk, st, pers, minor=M_, width=1: tk.Config(
        block_m=bm, block_n=64, block_k=bk, num_stages=st, split_k=1, persistent=pers, grid_minor_dim=minor,
        grid_tile_width=width)
    cfgs = [C(128, 128, 4, True), C(128, 64, 4, True), C(64, 128, 4, True), C(128, 128, 4, False),
            C(128, 256, 2, True), C(128, 128, 4, True, N_, 4), C(128, 128, 4, True, M_, 8), C(128, 64, 6, True)]
    return cfgs[:3] if quick else cfgs


def tk_name(c) -> str:
    return (f"tokamax {c.block_m}x{c.block_n}x{c.block_k} st{c.num_stages} "
            f"{'pers' if c.persistent else 'grid'} {c.grid_minor_dim.name}{c.grid_tile_width}")


def ours_name(c) -> str:
    return f"ours {c.block_m}x{c.block_n}x{c.block_k} st{c.stages}"


def candidates(quick: bool, on_gpu: bool):
    """gate/up and down candidates, in order; the first of each is what the model ran before this work."""
    gu, dn = [], []
    if on_gpu:
        gmm = _tokamax_gmm  # not moe_api.grouped_matmul: that runs our kernel first
        gu.append(("tokamax heuristic, gate & up (2 calls)", "heuristic", "g,u",
                   lambda a, ws, s: (jax.nn.silu(gmm(a, ws[0], s)) * gmm(a, ws[1], s))))
        gu.append(("tokamax heuristic, gate|up 2I", "heuristic", "gu", lambda a, ws, s: swiglu_xla(gmm(a, ws[0], s))))
        dn.append(("tokamax heuristic", "heuristic", "d", lambda a, ws, s: gmm(a, ws[0], s)))
        if hasattr(moe_api, "grouped_swiglu"):
            gu.append(("api.grouped_swiglu (kernels=gpu)", "api", "g,u",
                       lambda a, ws, s: moe_api.grouped_swiglu(a, ws[0], ws[1], s, kernels="gpu")))
        try:
            from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu as tk
            for c in tokamax_configs(quick):
                op = tk.PallasMosaicGpuRaggedDot(config=c)
                run = lambda a, w, s, op=op: op(a, w, group_sizes=s, preferred_element_type=a.dtype)
                gu.append((tk_name(c) + ", gate|up 2I", "tokamax", "gu",
                           lambda a, ws, s, run=run: swiglu_xla(run(a, ws[0], s))))
                dn.append((tk_name(c), "tokamax", "d", lambda a, ws, s, run=run: run(a, ws[0], s)))
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            RESULTS["errors"].append(f"tokamax configs: {e!r}")
            log(f"  tokamax explicit configs unavailable: {e!r}")
        if ours is None:
            log(f"  ours (kernels/moe/mosaic_gpu.py) not importable: {OURS_MISSING}")
        else:
            sw = getattr(ours, "SWIGLU_SWEEP", ours.SWEEP)
            for c in sw[:3] if quick else sw:
                gu.append((ours_name(c) + " grouped_swiglu", "ours", "g,u",
                           lambda a, ws, s, c=c: ours.grouped_swiglu(a, ws[0], ws[1], s, config=c)))
            for c in ours.SWEEP[:3] if quick else ours.SWEEP:
                dn.append((ours_name(c), "ours", "d", lambda a, ws, s, c=c: ours.grouped_matmul(a, ws[0], s, config=c)))
    else:  # CPU smoke run of this script: the jnp reference is the only candidate
        ref = lambda a, w, s: moe_ref.grouped_matmul(a, w, s)
        gu.append(("jnp reference (CPU)", "heuristic", "g,u", lambda a, ws, s: jax.nn.silu(ref(a, ws[0], s)) * ref(a, ws[1], s)))
        dn.append(("jnp reference (CPU)", "heuristic", "d", lambda a, ws, s: ref(a, ws[0], s)))
    return gu, dn


def finalists(cands, timed: dict):
    """The heuristics, api, and the two fastest of each other family (from an earlier token count)."""
    keep = []
    for fam in ("tokamax", "ours"):
        ranked = sorted((timed[n], n) for n, f, _, _ in cands if f == fam and n in timed)
        keep += [n for _, n in ranked[:2]]
    return [c for c in cands if c[1] in ("heuristic", "api") or c[0] in keep]


# ------------------------------------------------------------------------------------------------
# Reference rows
# ------------------------------------------------------------------------------------------------
def check_rows(sizes: np.ndarray, seed: int):
    """Sorted-row indices of six experts' rows (smallest non-empty, largest, first, last, two random), at most
    1024 rows each (the first and last 512 of a larger expert), and the expert of each row."""
    nonempty = np.flatnonzero(sizes)
    rng = np.random.default_rng(seed)
    pick = [nonempty[np.argmin(sizes[nonempty])], int(np.argmax(sizes)), nonempty[0], nonempty[-1],
            *rng.choice(nonempty, size=min(2, len(nonempty)), replace=False)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    idx, grp = [], []
    for e in dict.fromkeys(int(p) for p in pick):
        lo, hi = int(starts[e]), int(starts[e + 1])
        r = np.arange(lo, hi) if hi - lo <= 1024 else np.concatenate([np.arange(lo, lo + 512), np.arange(hi - 512, hi)])
        idx.append(r)
        grp.append(np.full(len(r), e))
    return np.concatenate(idx).astype(np.int32), np.concatenate(grp)


def reference_rows(lhs_rows: np.ndarray, grp: np.ndarray, weights, swiglu: bool):
    """fp32 numpy: each row through its expert's weights (swiglu: silu(x Wg) * (x Wu))."""
    n_out = weights[0].shape[2]
    out = np.zeros((lhs_rows.shape[0], n_out), np.float32)
    experts = np.unique(grp)
    picked = [np.asarray(w[jnp.asarray(experts)], np.float32) for w in weights]  # one gather per weight
    for i, e in enumerate(experts):
        rows = grp == e
        ws = [p[i] for p in picked]
        if swiglu:
            g, u = lhs_rows[rows] @ ws[0], lhs_rows[rows] @ ws[1]
            out[rows] = g / (1.0 + np.exp(-g)) * u
        else:
            out[rows] = lhs_rows[rows] @ ws[0]
    return out


def rel_err(out_rows, ref):
    out_rows = np.asarray(out_rows, np.float32)
    return float(np.linalg.norm(out_rows - ref) / max(np.linalg.norm(ref), 1e-30))


# ------------------------------------------------------------------------------------------------
# Layer variants
# ------------------------------------------------------------------------------------------------
def route_dispatch(m: MoE, x):
    top_w, top_e = m.route(x)
    order, slot, sizes = sort_by_expert(top_e, 0, m.gate_proj.shape[0])
    return top_w, slot, sizes, jnp.take(x, order // m.cfg.num_experts_per_tok, axis=0)


def dispatch_before(top_e, E):
    """The previous dispatch: argsort, bincount, gather."""
    flat = top_e.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, jnp.bincount(flat, length=E).astype(jnp.int32)


def combine_before(y, order, top_w, T, k):
    """The previous combine: weights in bf16, scatter-add of the weighted rows into bf16 tokens."""
    y = y * jnp.take(top_w.astype(y.dtype).reshape(-1), order)[:, None]
    return jnp.zeros((T, y.shape[-1]), y.dtype).at[order // k].add(y)


def combine_unrolled(y, slot, top_w, routed):
    """Alternative form of combine_experts: k row gathers of [T, D], summed in fp32."""
    acc = 0.0
    for j in range(slot.shape[1]):
        rows = jnp.take(y, slot[:, j], axis=0).astype(jnp.float32)
        acc = acc + jnp.where((slot[:, j] < routed)[:, None], rows * top_w[:, j:j + 1].astype(jnp.float32), 0.0)
    return acc.astype(y.dtype)


def _tokamax_gmm(lhs, rhs, sizes):
    """tokamax.ragged_dot with its heuristic tile config (kernels/moe/tokamax_gpu.py): the model's grouped
    matmul before our Mosaic GPU kernel."""
    from pcp_jax.kernels.moe import tokamax_gpu
    return tokamax_gpu.grouped_matmul(lhs, rhs, sizes)


def layer_before(m: MoE, x):
    k, E = m.cfg.num_experts_per_tok, m.gate_proj.shape[0]
    top_w, top_e = m.route(x)
    order, sizes = dispatch_before(top_e, E)
    xs = jnp.take(x, order // k, axis=0)
    gmm = lambda a, w: _tokamax_gmm(a, w, sizes)  # what the model ran before: tokamax's heuristic tiles
    y = gmm(jax.nn.silu(gmm(xs, m.gate_proj[...])) * gmm(xs, m.up_proj[...]), m.down_proj[...])
    return combine_before(y, order, top_w, x.shape[0], k) + m.shared_expert(x)


# ------------------------------------------------------------------------------------------------
# transformers
# ------------------------------------------------------------------------------------------------
def torch_block(cfg: ModelConfig, params: dict):
    """transformers' qwen3_5_moe sparse MoE block, grouped_mm experts, bf16, holding our weights in its layout.
    Returns (block, device, description)."""
    import torch
    import transformers
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hc = Qwen3_5MoeTextConfig(hidden_size=cfg.hidden_size, num_experts=cfg.num_experts,
                              num_experts_per_tok=cfg.num_experts_per_tok,
                              moe_intermediate_size=cfg.moe_intermediate_size,
                              shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                              experts_implementation="grouped_mm")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            block = Qwen3_5MoeSparseMoeBlock(hc)
    finally:
        torch.set_default_dtype(default)
    block = block.to_empty(device=dev).eval()

    def t(name, transpose=False):  # our input-major [.., in, out] -> torch's [.., out, in], contiguous
        a = to_torch(params[f"moe.{name}"], dev)
        return a.transpose(-1, -2).contiguous() if transpose else a.contiguous()

    with torch.no_grad():
        block.gate.weight.copy_(t("router", True))
        block.experts.gate_up_proj.copy_(torch.cat([t("gate_proj", True), t("up_proj", True)], dim=1))
        block.experts.down_proj.copy_(t("down_proj", True))
        if cfg.shared_expert_intermediate_size:
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.shared_expert, n).weight.copy_(t(f"shared.{n}", True))
            block.shared_expert_gate.weight.copy_(t("shared_gate", True))
    impl = block.experts.config._experts_implementation
    has_gmm = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    desc = (f"transformers {transformers.__version__} torch {torch.__version__}, experts_implementation={impl}, "
            f"torch grouped_mm available={has_gmm}")
    return block, dev, desc


def to_torch(a: jax.Array, dev: str):
    """A bf16 JAX array as a torch tensor on `dev`: shared through DLPack on the GPU, else through the host."""
    import torch
    if dev == "cuda":
        try:
            return torch.from_dlpack(a)
        except Exception as e:  # noqa: BLE001 - fall back to a host copy
            log(f"  (DLPack to torch failed: {e!r}; copying through the host)")
    host = np.array(np.asarray(a)).view(np.uint16)  # a writable copy
    return torch.from_numpy(host).view(torch.bfloat16).to(dev)


def torch_time(fn, dev, reps=7):
    import torch
    fn()
    fn()
    if dev != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------
class Case:
    """One (preset, T): inputs, routing, check rows and their fp32 references."""

    def __init__(self, name, cfg, params, layer_state, graphdef, T, state):
        self.name, self.cfg, self.params, self.st, self.gd, self.T = name, cfg, params, layer_state, graphdef, T
        self.D, self.E, self.k = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok
        self.I, self.Is = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        self.M = M = T * self.k
        self.tag = f"{name} T={T}"
        self.x = jax.random.normal(jax.random.PRNGKey(T), (T, self.D), jnp.bfloat16)
        j = jax.jit(lambda st, x: (nnx.merge(graphdef, st).route(x)[1], *route_dispatch(nnx.merge(graphdef, st), x)))
        self.top_e, self.top_w, self.slot, self.sizes, self.xs = j(layer_state, self.x)
        self.sizes_np = np.asarray(self.sizes)
        if int(self.sizes_np.sum()) != M:
            raise RuntimeError(f"routed rows {self.sizes_np.sum()} != T·k = {M}")
        self.h_in = jax.random.normal(jax.random.PRNGKey(T + 1), (M, self.I), jnp.bfloat16)
        self.ws = {"g,u": (params["moe.gate_proj"], params["moe.up_proj"]), "d": (params["moe.down_proj"],)}
        if "w_gu" in state:
            self.ws["gu"] = (state["w_gu"],)
        self.flops = {"gate/up": 2.0 * M * self.D * 2 * self.I, "down": 2.0 * M * self.I * self.D}
        self.layer_flops = (2.0 * T * self.D * self.E + 2.0 * M * 3 * self.D * self.I
                            + (2.0 * T * (3 * self.D * self.Is + self.D) if self.Is else 0.0))

    def log_routing(self):
        s = self.sizes_np
        log(f"  routing: rows per expert min {s.min()} median {int(np.median(s))} max {s.max()}, "
            f"{int((s == 0).sum())} experts empty")

    def references(self):
        idx, grp = check_rows(self.sizes_np, self.T)
        self.jidx = jnp.asarray(idx)
        self.ref = {"gate/up": reference_rows(np.asarray(self.xs[self.jidx], np.float32), grp, self.ws["g,u"], True),
                    "down": reference_rows(np.asarray(self.h_in[self.jidx], np.float32), grp, self.ws["d"], False)}
        self.lhs = {"gate/up": self.xs, "down": self.h_in}
        log(f"  check rows: {len(idx)} rows of experts {sorted(set(grp.tolist()))}")


def time_parts(c: Case):
    """Router, dispatch and combine alone: the model's forms and the previous ones."""
    k, E, gd = c.k, c.E, c.gd
    y = jax.random.normal(jax.random.PRNGKey(c.T + 2), (c.M, c.D), jnp.bfloat16)
    routed = jnp.int32(c.M)
    j_comb, j_alt = jax.jit(combine_experts), jax.jit(combine_unrolled)
    j_before = jax.jit(combine_before, static_argnums=(3, 4))
    order_b, _ = jax.jit(dispatch_before, static_argnums=1)(c.top_e, E)
    c_model = np.asarray(j_comb(y, c.slot, c.top_w, routed), np.float32)
    for label, a in (("combine alt", j_alt(y, c.slot, c.top_w, routed)),
                     ("combine before", j_before(y, order_b, c.top_w, c.T, k))):
        err = rel_err(a, c_model)
        ok = bool(err <= TOL)
        RESULTS["checks"].append(dict(case=c.tag, stage="combine", candidate=label, rel_err=err, tol=TOL, ok=ok))
        log(f"  [{'PASS' if ok else 'FAIL'}] {label} vs combine model: rel err {err:.2e}")
    del c_model
    parts = [
        ("router (matmul + fp32 softmax + top-k)", jax.jit(lambda st, x: nnx.merge(gd, st).route(x)), (c.st, c.x),
         2.0 * c.T * c.D * E),
        ("dispatch model (sort_by_expert + gather)",
         jax.jit(lambda e, x: (lambda o, s, g: (jnp.take(x, o // k, axis=0), s, g))(*sort_by_expert(e, 0, E))),
         (c.top_e, c.x), None),
        ("dispatch before (argsort + bincount + gather)",
         jax.jit(lambda e, x: (lambda o, g: (jnp.take(x, o // k, axis=0), g))(*dispatch_before(e, E))),
         (c.top_e, c.x), None),
        ("combine model (combine_experts: gather, fp32 sum)", j_comb, (y, c.slot, c.top_w, routed), None),
        ("combine alt (k row gathers, fp32 sum)", j_alt, (y, c.slot, c.top_w, routed), None),
        ("combine before (bf16 scatter-add)", j_before, (y, order_b, c.top_w, c.T, k), None),
    ]
    log("  -- parts")
    for pname, fn, a, fl in parts:
        ms = bench(fn, *a)
        extra = f" {fl / ms / 1e9:6.0f} TFLOP/s" if fl else ""
        RESULTS["parts"].append(dict(case=c.tag, preset=c.name, T=c.T, part=pname, ms=ms))
        log(f"         {pname:52s} {ms:8.3f} ms{extra}")


def time_layers(c: Case, layers, outs: dict):
    """Each (name, jitted fn, args) once for its output, then timed; outputs after the first are checked
    against the first one (same routing code: bf16 roundings only)."""
    for lname, fn, a in layers:
        try:
            out = jax.block_until_ready(fn(*a))
            ms = bench(fn, *a)
        except Exception as e:  # noqa: BLE001
            msg = f"{c.tag} layer {lname}: {type(e).__name__}: {str(e)[:300]}"
            RESULTS["errors"].append(msg)
            log(f"  [FAIL] {msg}")
            continue
        if outs:
            err = rel_err(out, np.asarray(next(iter(outs.values())), np.float32))
            ok = bool(err <= TORCH_TOL)
            RESULTS["checks"].append(dict(case=c.tag, stage="layer", candidate=lname, rel_err=err, tol=TORCH_TOL, ok=ok))
            log(f"  [{'PASS' if ok else 'FAIL'}] layer {lname} vs {next(iter(outs))}: rel err {err:.2e}")
        outs.setdefault(lname, out)
        tf = c.layer_flops / ms / 1e9
        RESULTS["layers"].append(dict(case=c.tag, preset=c.name, T=c.T, variant=lname, ms=ms, tflops=tf,
                                      of_peak=tf / PEAK_TFLOPS))
        log(f"         {lname:70s} {ms:8.3f} ms {tf:6.0f} TFLOP/s {100 * tf / PEAK_TFLOPS:5.1f}%")


def time_torch(c: Case, torch_blk, ref_layer):
    import torch
    block, dev, desc = torch_blk
    T, D = c.T, c.D
    try:
        xt = to_torch(c.x, dev).reshape(1, T, D).contiguous()
        with torch.inference_mode():
            yt = block(xt)
            _, _, hf_e = block.gate(xt.reshape(T, D))
            ms = torch_time(lambda: block(xt), dev)
        if ref_layer is not None:
            # Tokens whose top-k sets differ (bf16 logits rounded differently near a tie) are left out.
            same = np.all(np.sort(hf_e.cpu().numpy(), -1) == np.sort(np.asarray(c.top_e), -1), axis=-1)
            err = rel_err(yt.float().reshape(T, D).cpu().numpy()[same], np.asarray(ref_layer, np.float32)[same])
            ok = bool(err <= TORCH_TOL and same.mean() >= 0.8)
            RESULTS["checks"].append(dict(case=c.tag, stage="layer", candidate="transformers", rel_err=err,
                                          tol=TORCH_TOL, ok=ok, same_topk=float(same.mean())))
            log(f"  [{'PASS' if ok else 'FAIL'}] transformers block vs ours: rel err {err:.2e} on the "
                f"{100 * same.mean():.1f}% of tokens routed alike")
        tf = c.layer_flops / ms / 1e9
        RESULTS["layers"].append(dict(case=c.tag, preset=c.name, T=T, variant="transformers grouped_mm", ms=ms,
                                      tflops=tf, of_peak=tf / PEAK_TFLOPS, desc=desc))
        log(f"         {'transformers Qwen3_5MoeSparseMoeBlock (grouped_mm)':70s} {ms:8.3f} ms {tf:6.0f} TFLOP/s "
            f"{100 * tf / PEAK_TFLOPS:5.1f}%")
    except Exception as e:  # noqa: BLE001
        msg = f"{c.tag} transformers: {type(e).__name__}: {str(e)[:300]}"
        RESULTS["errors"].append(msg)
        log(f"  [FAIL] {msg}")


def sweep_stage(c: Case, stage: str, cands, state):
    """Check each candidate of one stage against the fp32 rows, time those that pass; returns the fastest."""
    log(f"  -- {stage}: {len(cands)} candidates")
    lhs, ref, flops = c.lhs[stage], c.ref[stage], c.flops[stage]
    heur_ms, timed = None, {}
    for cname, fam, wkey, fn in cands:
        jf = jax.jit(fn)
        try:
            out = jax.block_until_ready(jf(lhs, c.ws[wkey], c.sizes))
        except NotImplementedError as e:
            log(f"  [SKIP] {stage:7s} {cname}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is reported, not timed
            msg = f"{c.tag} {stage} {cname}: {type(e).__name__}: {str(e)[:300]}"
            RESULTS["errors"].append(msg)
            log(f"  [FAIL] {msg}")
            continue
        err = rel_err(out[c.jidx], ref)
        ok = bool(np.isfinite(err) and err <= TOL)
        RESULTS["checks"].append(dict(case=c.tag, stage=stage, candidate=cname, rel_err=err, tol=TOL, ok=ok))
        log(f"  [{'PASS' if ok else 'FAIL'}] {stage:7s} {cname:52s} rel err {err:.2e}")
        del out
        if not ok:
            continue
        ms = bench(jf, lhs, c.ws[wkey], c.sizes)
        tf = flops / ms / 1e9
        if fam == "heuristic" and heur_ms is None:
            heur_ms = ms
        timed[cname] = ms
        RESULTS["stages"].append(dict(case=c.tag, preset=c.name, T=c.T, stage=stage, candidate=cname, family=fam,
                                      ms=ms, tflops=tf, of_peak=tf / PEAK_TFLOPS))
        vs = f"  x{heur_ms / ms:.2f} vs heuristic" if heur_ms else ""
        log(f"         {stage:7s} {cname:52s} {ms:8.3f} ms {tf:6.0f} TFLOP/s {100 * tf / PEAK_TFLOPS:5.1f}%{vs}")
    state["timed"].setdefault(c.name, {}).setdefault(stage, {}).update(timed)
    state["last"][stage] = state["timed"][c.name][stage]
    if not timed:
        return None
    bname = min(timed, key=timed.get)
    log(f"  best {stage}: {bname} {timed[bname]:.3f} ms")
    return next(cd for cd in cands if cd[0] == bname)


def run_case(name, cfg, params, layer_state, graphdef, T, gu_cands, dn_cands, state, args, torch_blk):
    """Parts, the model's layer (before/after) and transformers first, then the stage sweeps (a candidate kernel
    that breaks the GPU context cannot take the baseline rows with it), then the layer with the best ones."""
    log(f"\n== {name} T={T}: D={cfg.hidden_size} E={cfg.num_experts} top-{cfg.num_experts_per_tok} "
        f"I={cfg.moe_intermediate_size} shared={cfg.shared_expert_intermediate_size}, M={T * cfg.num_experts_per_tok} "
        f"routed rows  ({time.time() - T0:.0f} s)")
    c = Case(name, cfg, params, layer_state, graphdef, T, state)
    c.log_routing()
    time_parts(c)
    log(f"  -- whole layer ({c.layer_flops / 1e12:.2f} TFLOP)")
    outs: dict = {}
    if state["on_gpu"]:
        ctx = gpu_ctx()
        time_layers(c, [("model: MoE.__call__ (this commit)",
                         jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, ctx)), (layer_state, c.x)),
                        ("before: argsort/bincount, bf16 scatter-add",
                         jax.jit(lambda st, x: layer_before(nnx.merge(graphdef, st), x)), (layer_state, c.x))], outs)
    if torch_blk is not None and state["on_gpu"]:
        time_torch(c, torch_blk, next(iter(outs.values()), None))
    save(args.out)

    c.references()
    sweep = state["timed"].get(name) is None and time.time() - T0 < args.budget_s
    best = {}
    for stage, cands in (("gate/up", gu_cands), ("down", dn_cands)):
        if not sweep:  # this preset's earlier timings, else (over budget) the previous preset's
            cands = finalists(cands, state["timed"].get(name, {}).get(stage) or state["last"].get(stage, {}))
        best[stage] = sweep_stage(c, stage, cands, state)
        save(args.out)
    if best["gate/up"] and best["down"]:
        (gname, _, gkey, gfn), (dname, _, dkey, dfn) = best["gate/up"], best["down"]

        def layer_best(st, x, wg, wd):
            m = nnx.merge(graphdef, st)
            top_w, slot, sizes, xs = route_dispatch(m, x)
            y = dfn(gfn(xs, wg, sizes), wd, sizes)
            return combine_experts(y, slot, top_w, jnp.sum(sizes)) + m.shared_expert(x)

        log("  -- whole layer with the best candidates")
        time_layers(c, [(f"best: {gname} + {dname}", jax.jit(layer_best), (layer_state, c.x, c.ws[gkey], c.ws[dkey]))],
                    outs)
    if torch_blk is not None and not state["on_gpu"]:  # CPU smoke run: checked against the best layer
        time_torch(c, torch_blk, next(iter(outs.values()), None))


# ------------------------------------------------------------------------------------------------
def summary():
    log("\n== summary (ms; TFLOP/s; % of 799)")
    bad = [c for c in RESULTS["checks"] if not c["ok"]]
    log(f"  checks: {len(RESULTS['checks']) - len(bad)}/{len(RESULTS['checks'])} passed")
    for c in bad:
        log(f"  FAILED CHECK {c['case']} {c['stage']} {c['candidate']}: {c['rel_err']:.2e} > {c['tol']:.0e}")
    cases = list(dict.fromkeys(r["case"] for r in RESULTS["stages"] + RESULTS["layers"]))
    for case in cases:
        log(f"  {case}")
        for stage in ("gate/up", "down"):
            rows = [r for r in RESULTS["stages"] if r["case"] == case and r["stage"] == stage]
            heur = next((r for r in rows if r["family"] == "heuristic"), None)
            for r in list(dict.fromkeys(map(id, sorted(rows, key=lambda r: r["ms"])[:3] + ([heur] if heur else [])))):
                r = next(q for q in rows if id(q) == r)
                log(f"    {stage:7s} {r['candidate']:52s} {r['ms']:8.3f} {r['tflops']:6.0f} {100 * r['of_peak']:5.1f}%")
        ly = [r for r in RESULTS["layers"] if r["case"] == case]
        hf = next((r["ms"] for r in ly if r["variant"].startswith("transformers")), None)
        for r in ly:
            vs = f"  x{hf / r['ms']:.2f} vs transformers" if hf else ""
            log(f"    layer   {r['variant'][:52]:52s} {r['ms']:8.3f} {r['tflops']:6.0f} {100 * r['of_peak']:5.1f}%{vs}")
    for e in RESULTS["errors"]:
        log(f"  ERROR {e[:300]}")


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--presets", default=DEFAULT_PRESETS)
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--quick", action="store_true", help="3 tokamax configs and 3 of ours per stage")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="after this many seconds, remaining cases time only the finalists")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-ours", action="store_true", help="leave out kernels/moe/mosaic_gpu.py")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    RESULTS["meta"] = dict(device=dev.device_kind, jax=jax.__version__, date=datetime.date.today().isoformat(),
                           argv=sys.argv, peak_tflops=PEAK_TFLOPS)
    log(f"device {dev.device_kind}, jax {jax.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    gu_cands, dn_cands = candidates(args.quick, on_gpu)
    if args.no_ours:
        gu_cands, dn_cands = ([c for c in cs if c[1] != "ours"] for cs in (gu_cands, dn_cands))
    log(f"candidates: gate/up {len(gu_cands)}, down {len(dn_cands)}")
    state = {"timed": {}, "last": {}, "on_gpu": on_gpu}
    for spec in args.presets.split(","):
        name, cfg = shape_of(spec)
        try:
            params = random_params(cfg)
            layer = MoE(cfg, params, "moe", jnp.bfloat16)
            graphdef, layer_state = nnx.split(layer)
            if any(c[2] == "gu" for c in gu_cands):
                state["w_gu"] = jnp.concatenate([params["moe.gate_proj"], params["moe.up_proj"]], axis=-1)
            torch_blk = None
            if not args.no_torch and cfg.shared_expert_intermediate_size:  # its block always has a shared expert
                try:
                    torch_blk = torch_block(cfg, params)
                    log(f"  {torch_blk[2]}")
                except Exception as e:  # noqa: BLE001
                    RESULTS["errors"].append(f"{name} transformers block: {e!r}")
                    log(f"  transformers block unavailable: {e!r}")
            for T in tokens:
                try:
                    run_case(name, cfg, params, layer_state, graphdef, T, gu_cands, dn_cands, state, args, torch_blk)
                except Exception as e:  # noqa: BLE001 - one case failing must not lose the others
                    RESULTS["errors"].append(f"{name} T={T}: {e!r}")
                    log(f"  case {name} T={T} FAILED:\n{traceback.format_exc()}")
                save(args.out)
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"{name}: {e!r}")
            log(f"  preset {name} FAILED:\n{traceback.format_exc()}")
        finally:
            params = layer = layer_state = torch_blk = None
            state.pop("w_gu", None)
            if "torch" in sys.modules:
                sys.modules["torch"].cuda.empty_cache()
        save(args.out)
    summary()
    log(f"total {time.time() - T0:.0f} s")
    save(args.out)


if __name__ == "__main__":
    main()

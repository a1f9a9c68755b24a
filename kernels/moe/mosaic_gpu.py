"""Grouped matmul for MoE on Hopper: our Pallas Mosaic GPU kernel (warp-specialized, persistent).

Contract (reference.grouped_matmul): lhs [M, K] rows sorted by expert, rhs [E, K, N], group_sizes [E] int;
returns [M, N] in lhs's dtype, row r = lhs[r] @ rhs[expert(r)], rows past sum(group_sizes) are 0; fp32
accumulation. `grouped_swiglu(lhs, w_gate, w_up, group_sizes)` = silu(lhs @ w_gate[e]) * (lhs @ w_up[e]) per
row, [M, I], both products and the activation in fp32 inside one kernel (`swiglu_reference` is its jnp
contract), so the [M, 2I] gate/up activations are never written to memory.

How the work is cut:
- A *row tile* is `block_m` consecutive sorted rows that belong to one expert: expert e's rows [s, t) are
  covered by windows starting at s rounded down to 8, each `block_m` rows; a window may begin inside the
  previous expert's rows, but a tile stores only its own expert's rows (`row_tiles`). Padding rows (past the
  routed ones) form one more pseudo-expert whose tiles store zeros, so the output needs no extra masking pass.
- A *work item* is (row tile, block of 2·block_n output columns). One CTA per SM loops over the items
  (persistent); consecutive items share a row tile, so the experts' weights and rows stay in L2.
- Inside a CTA, one warpgroup issues TMA loads of the lhs window [block_m, block_k] and the weight blocks
  [block_k, 2·block_n] into a `stages`-deep ring of shared memory; two compute warpgroups each multiply the
  window by their half of the columns with wgmma into fp32 registers. grouped_swiglu loads the gate and the up
  blocks and keeps two accumulators per warpgroup; the epilogue applies silu(g)·u.
- The epilogue writes each warpgroup's [block_m, block_n] tile to shared memory and stores the tile's rows
  with TMA in power-of-two pieces (the row count is only known at run time).
- Tile sizes (`default_config`, unless a config is given): 128-row tiles, or 192-row ones where the experts'
  expected rows fit one 192-row tile but would take two of 128.

Limits (NotImplementedError; kernels/moe/api.py then runs tokamax or the jnp reference): bf16/fp16 operands
of one dtype, K a multiple of block_k, N (or I) a multiple of 2·block_n.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import reference

f32 = jnp.float32
ALIGN = 8  # row-tile starts are multiples of this (TMA-friendly; wastes < 8 rows per expert)
NUM_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class Config:
    """block_m rows per tile; block_n output columns per compute warpgroup (a CTA covers 2·block_n);
    block_k the contraction step; stages the depth of the shared-memory ring. Registers bound the
    accumulators: block_m·block_n fp32 per warpgroup (two for grouped_swiglu) must stay within 192·128
    (192 of a compute thread's 232 registers), and the ring plus the output tiles within shared memory
    (`smem_bytes`). A block_m of 192 or 256 covers an expert's rows in one tile where a mean of 129-256 rows
    per expert would take two 128-row tiles (the 397B at 8k tokens: 160).
    chain: the CTA's consecutive items run as one pipeline (Pallas' pipeline of pipelines), so the memory
    warpgroup loads the next item's first blocks while the compute warpgroups finish and store this one;
    it needs K/block_k to be a multiple of stages and waits for each wgmma before releasing its buffers."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 3
    chain: bool = False  # one pipeline across a CTA's work items: the next item's loads overlap this epilogue
    swizzle_out: bool = False  # output tile in swizzled rows of shared memory (fewer bank conflicts on the store)


MATMUL_CONFIG = Config(block_m=128, block_n=128, block_k=64, stages=3)
SWIGLU_CONFIG = Config(block_m=128, block_n=64, block_k=64, stages=4)
# 192-row tiles, for experts expected to hold 129-192 rows (`default_config`).
WIDE_MATMUL_CONFIG = Config(block_m=192, block_n=64, block_k=64, stages=4)
WIDE_SWIGLU_CONFIG = Config(block_m=192, block_n=64, block_k=64, stages=3)
WIDE_MATMUL_CHAINED = dataclasses.replace(WIDE_MATMUL_CONFIG, chain=True)  # where K/block_k allows it


def default_config(num_rows: int, num_groups: int, swiglu: bool, contraction: int | None = None) -> Config:
    """The tiles for `num_rows` sorted rows over `num_groups` experts, from the static shapes (the sizes are
    known on the device only): 192-row tiles where an expert's expected rows, the mean plus one Poisson
    deviation, fit one of them but need two of 128 rows; else 128-row tiles. On an H200 (run K13) the 397B at
    8k tokens (160 rows per expert) went from 3.85 to 3.05 ms in SwiGLU and 2.16 to 1.78 ms in down, while at
    256 rows per expert (122B and 35B at 8k) and 640 (397B at 32k) the 192-row tiles were 6-17% slower.
    The 192-row matmul runs its items as one chained pipeline when the contraction length `contraction`
    (K) splits into a multiple of its stages (run K17: 397B down at 8k 1.74 -> 1.65 ms)."""
    mean = num_rows / max(num_groups, 1)
    if 128 < mean + mean**0.5 <= 192:
        if swiglu:
            return WIDE_SWIGLU_CONFIG
        steps = (contraction or 0) // WIDE_MATMUL_CONFIG.block_k
        return WIDE_MATMUL_CHAINED if steps and steps % WIDE_MATMUL_CONFIG.stages == 0 else WIDE_MATMUL_CONFIG
    return SWIGLU_CONFIG if swiglu else MATMUL_CONFIG


_MAX_ACC_ELEMS = 192 * 128  # fp32 accumulator elements per warpgroup: 192 registers per thread (of 232)
SMEM_BYTES = 227 * 1024 - 1024  # Hopper's shared memory per block, less room for the pipeline's barriers


def smem_bytes(cfg: Config, num_rhs: int, itemsize: int) -> int:
    """Shared memory the kernel allocates: the ring of lhs/weight blocks and the two output tiles."""
    cta_n = NUM_COMPUTE_WGS * cfg.block_n
    ring = cfg.stages * (cfg.block_m * cfg.block_k + num_rhs * cfg.block_k * cta_n) * itemsize
    return ring + NUM_COMPUTE_WGS * cfg.block_m * cfg.block_n * itemsize


def check_supported(lhs, rhs_list, cfg: Config) -> None:
    dt = lhs.dtype
    if dt not in (jnp.bfloat16, jnp.float16) or any(r.dtype != dt for r in rhs_list):
        raise NotImplementedError(f"mosaic grouped matmul: lhs {dt} / rhs {[str(r.dtype) for r in rhs_list]}; "
                                  "needs matching bf16/fp16 operands")
    K = lhs.shape[1]
    N = rhs_list[0].shape[2]
    if K % cfg.block_k:
        raise NotImplementedError(f"mosaic grouped matmul: K={K} is not a multiple of block_k={cfg.block_k}")
    if N % (NUM_COMPUTE_WGS * cfg.block_n):
        raise NotImplementedError(f"mosaic grouped matmul: N={N} is not a multiple of "
                                  f"{NUM_COMPUTE_WGS}·block_n={NUM_COMPUTE_WGS * cfg.block_n}")
    if cfg.block_m % ALIGN or cfg.block_m > 256 or cfg.block_m < 64:
        raise NotImplementedError(f"mosaic grouped matmul: block_m={cfg.block_m}; 64..256, a multiple of {ALIGN}")
    if cfg.block_m * cfg.block_n * len(rhs_list) > _MAX_ACC_ELEMS:
        raise NotImplementedError(f"mosaic grouped matmul: {len(rhs_list)} accumulator(s) of "
                                  f"{cfg.block_m}x{cfg.block_n} fp32 exceed the register budget")
    if cfg.chain and ((K // cfg.block_k) % cfg.stages or not hasattr(plgpu, "PipelinePipeline")):
        raise NotImplementedError(f"mosaic grouped matmul: chain needs K/block_k={K // cfg.block_k} to be a multiple "
                                  f"of stages={cfg.stages} (and a jax with pipelines of pipelines)")
    if (need := smem_bytes(cfg, len(rhs_list), jnp.dtype(dt).itemsize)) > SMEM_BYTES:
        raise NotImplementedError(f"mosaic grouped matmul: {cfg} needs {need} bytes of shared memory > {SMEM_BYTES}")


def row_tiles(group_sizes, num_rows: int, block_m: int):
    """The row tiles of `num_rows` sorted rows (num_rows a multiple of ALIGN, at least block_m).

    group_sizes [E] int; rows past their sum form pseudo-group E (zero-filled). Returns four int32 arrays
    of a static length (an upper bound on the number of tiles; tiles past the used ones have size 0), and
    the number of tiles of real experts [1] (they come first, then the padding tiles):
      group [n]  expert of the tile (E: padding rows, store zeros),
      start [n]  first row of the tile's block_m-row window (a multiple of ALIGN, window inside num_rows),
      lo [n]     offset in the window of the tile's first row,
      size [n]   number of rows the tile stores (rows [start + lo, start + lo + size)).
    """
    E = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    sizes = jnp.concatenate([sizes, (num_rows - jnp.sum(sizes))[None]])  # + the padding pseudo-group
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = (starts // ALIGN) * ALIGN
    per_group = jnp.where(sizes > 0, -(-(ends - first) // block_m), 0)
    tile_end = jnp.cumsum(per_group)
    # Each non-empty group adds at most ALIGN - 1 rows before its start and one partial tile.
    nonempty = min(E, num_rows) + 1
    n = (num_rows + nonempty * (block_m + ALIGN - 2)) // block_m
    t = jnp.arange(n, dtype=jnp.int32)
    # One fused comparison of every tile with every group end ([n, E + 1]; under 10^7 at a million rows) instead
    # of the default binary search, a loop of ~20 tiny kernels (0.1 ms busy plus launch gaps per call, run K15).
    group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right", method="compare_all"), E).astype(jnp.int32)
    window = first[group] + (t - (tile_end - per_group)[group]) * block_m
    lo = jnp.maximum(window, starts[group])
    hi = jnp.minimum(window + block_m, ends[group])
    size = jnp.maximum(hi - lo, 0)
    start = jnp.minimum(window, num_rows - block_m)  # keep the window inside the rows; lo/size unchanged
    real = tile_end[E - 1:E].astype(jnp.int32)  # [1]: the tiles of real experts come first
    return group, start.astype(jnp.int32), (lo - start).astype(jnp.int32), size.astype(jnp.int32), real


def _swizzled(shape_minor: int, dtype):
    swizzle = plgpu.find_swizzle(shape_minor * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _kernel(group_ref, start_ref, lo_ref, size_ref, real_ref, lhs_ref, *refs, cfg: Config, num_rhs: int,
            num_tiles: int, num_groups: int):
    """Refs: row-tile tables [num_tiles] and real-tile count [1] int32 (GMEM), lhs [Mp, K], num_rhs weights
    [E, K, N], out [Mp, N]."""
    rhs_refs, out_ref = refs[:num_rhs], refs[num_rhs]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    cta_n = NUM_COMPUTE_WGS * bn
    K = lhs_ref.shape[1]
    n_blocks = out_ref.shape[1] // cta_n
    dtype = lhs_ref.dtype
    delay = 0 if cfg.chain else 1  # wgmmas left in flight when a step ends (a pipeline of pipelines needs 0)
    in_specs = [plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=_swizzled(bk, dtype), delay_release=delay)]
    in_specs += [plgpu.BlockSpec((bk, cta_n), lambda k: (k, 0), transforms=_swizzled(bk, dtype),
                                 delay_release=delay)] * num_rhs

    def pipeline(body, context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(K // bk,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
            num_compute_wgs=NUM_COMPUTE_WGS, max_concurrent_steps=cfg.stages, compute_context=context,
            pipeline_state=state)

    unused = lambda *_, **__: None
    allocations = pipeline(unused, unused).get_allocations(lhs_ref, *(r.at[0] for r in rhs_refs))

    # Rows of the output tile are stored from any offset, so the tile is never tiled along rows; swizzling
    # within each row keeps the register-to-shared-memory store of the wgmma layout free of bank conflicts.
    out_transforms = ()
    if cfg.swizzle_out:
        swizzle = plgpu.find_swizzle(bn * jnp.dtype(out_ref.dtype).itemsize * 8)
        out_transforms = (plgpu.TilingTransform((1, swizzle // jnp.dtype(out_ref.dtype).itemsize)),
                          plgpu.SwizzleTransform(swizzle))

    @functools.partial(pl.run_scoped, allocations=allocations,
                       out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, bm, bn), out_ref.dtype, transforms=out_transforms),
                       collective_axes="wg")
    def _scope(allocations, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_tiles * n_blocks,), collective_axes="sm")
        def _item(info):
            (item,) = info.index
            t, j = lax.div(item, n_blocks), lax.rem(item, n_blocks)
            group, start, lo, size = group_ref[t], start_ref[t], lo_ref[t], size_ref[t]
            start = pl.multiple_of(start, ALIGN)
            col0 = j * cta_n

            def store(tile):
                """Write this warpgroup's [bm, bn] tile rows [lo, lo + size) to out."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's store has read out_smem
                out_smem[wg] = tile.astype(out_smem.dtype)
                plgpu.commit_smem()
                cols = pl.ds(col0 + wg * bn, bn)
                offset = lo
                piece = 1 << (bm.bit_length() - 1)
                while piece:
                    @pl.when((size & piece) != 0)
                    def _copy(offset=offset, piece=piece):
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, pl.ds(offset, piece)],
                                                out_ref.at[pl.ds(start + offset, piece), cols], commit_group=False)

                    offset = offset + (size & piece)
                    piece //= 2
                plgpu.commit_smem_to_gmem_group()

            def context(run):
                @functools.partial(pl.run_scoped, accs=[plgpu.ACC((bm, bn), f32) for _ in range(num_rhs)])
                def _accs(accs):
                    run(accs)
                    vals = [a[...] for a in accs]
                    if num_rhs == 1:
                        store(vals[0])
                    else:
                        g, u = vals
                        store(g / (1.0 + jnp.exp(-g)) * u)

            def mma(_, lhs_smem, *rest):
                rhs_smem, accs = rest[:num_rhs], rest[num_rhs]
                for acc, w in zip(accs, rhs_smem):
                    plgpu.wgmma(acc, lhs_smem, w.at[:, pl.ds(wg * bn, bn)])
                plgpu.wgmma_wait(delay)
                return accs

            blocks = (lhs_ref.at[pl.ds(start, bm), :], *(r.at[group, :, pl.ds(col0, cta_n)] for r in rhs_refs))
            real = (size > 0) & (group < num_groups)
            if not cfg.chain:
                pl.when(real)(lambda: pipeline(mma, context)(*blocks, allocations=allocations))
            else:
                # Real items come first: this CTA's first item starts the chain, its last real one ends it.
                first = info.local_index == 0
                last = item + lax.axis_size("sm") >= real_ref[0] * n_blocks
                pl.when(real & first & last)(lambda: pipeline(mma, context)(*blocks, allocations=allocations))
                P = plgpu.PipelinePipeline
                state = jnp.where(first, int(P.START), jnp.where(last, int(P.STOP), int(P.STEADY)))
                pl.when(real & ~(first & last))(
                    lambda: pipeline(mma, context, state)(*blocks, allocations=allocations))

            @pl.when((size > 0) & (group == num_groups) & (wg < NUM_COMPUTE_WGS))
            def _zeros():
                store(jnp.zeros((bm, bn), f32))

        plgpu.wait_smem_to_gmem(0)


def _interpret_params(interpret):
    """False: compile for the GPU. True: the Pallas GPU interpreter (CPU tests; buffers start as NaN, so rows the
    kernel fails to write show). An InterpretGPUParams is passed through (e.g. detect_races=True)."""
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret or None


def _run(lhs, rhs_list, group_sizes, cfg: Config, interpret):
    check_supported(lhs, rhs_list, cfg)
    M, K = lhs.shape
    E, _, N = rhs_list[0].shape
    rows = max(-(-M // ALIGN) * ALIGN, cfg.block_m)
    if rows != M:
        lhs = jnp.pad(lhs, ((0, rows - M), (0, 0)))
    tables = row_tiles(group_sizes, rows, cfg.block_m)
    num_tiles = tables[0].shape[0]
    num_sms = 2 if interpret is not False else jax.extend.backend.get_default_device().core_count
    kern = functools.partial(_kernel, cfg=cfg, num_rhs=len(rhs_list), num_tiles=num_tiles, num_groups=E)
    call = plgpu.kernel(
        kern, out_type=jax.ShapeDtypeStruct((rows, N), lhs.dtype), grid=(num_sms,), grid_names=("sm",),
        num_threads=NUM_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret))
    out = call(*tables, lhs, *rhs_list)
    return out[:M] if rows != M else out


def grouped_matmul(lhs, rhs, group_sizes, *, config: Config | None = None, interpret: bool = False):
    """lhs [M, K] sorted by group, rhs [E, K, N], group_sizes [E] -> [M, N] (contract: module docstring)."""
    config = config or default_config(lhs.shape[0], rhs.shape[0], swiglu=False, contraction=lhs.shape[1])
    return _run(lhs, [rhs], group_sizes, config, interpret)


def grouped_swiglu(lhs, w_gate, w_up, group_sizes, *, config: Config | None = None, interpret: bool = False):
    """lhs [M, K] sorted by group, w_gate/w_up [E, K, I] -> silu(lhs @ w_gate[e]) * (lhs @ w_up[e]) [M, I]."""
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} differ")
    config = config or default_config(lhs.shape[0], w_gate.shape[0], swiglu=True)
    return _run(lhs, [w_gate, w_up], group_sizes, config, interpret)


def swiglu_reference(lhs, w_gate, w_up, group_sizes):
    """jnp contract of grouped_swiglu: both products accumulated in fp32, activation in fp32, one rounding."""
    g = reference.grouped_matmul(lhs.astype(f32), w_gate.astype(f32), group_sizes)
    u = reference.grouped_matmul(lhs.astype(f32), w_up.astype(f32), group_sizes)
    return (jax.nn.silu(g) * u).astype(lhs.dtype)

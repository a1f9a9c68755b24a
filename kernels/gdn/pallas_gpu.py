"""Chunked gated delta rule forward as Pallas kernels for NVIDIA GPUs (Triton lowering; Hopper-tuned).

Contract: `reference.chunk_gated_delta_rule` (same arguments, same outputs):
  q, k [B, T, Hk, dk] (l2-normalised by the caller), v [B, T, Hv, dv] with Hv = G * Hk, g, beta
  [B, T, Hv] fp32, initial_state [B, Hv, dk, dv] fp32 or None -> (o [B, T, Hv, dv] in v's dtype,
  final_state [B, Hv, dk, dv] fp32). Value head h reads q/k head h // G through the kernels' index maps;
  the repeat is never materialised. Any T: padded internally to a multiple of the chunk with g = beta = 0
  tokens, which leave the state unchanged.

Stages (each its own pallas_call; the split follows the usual chunked WY form; `Tiling.fuse` picks one of
three pipelines, all with this math):
  1. `_wy_kernel`, parallel over (batch, value head, chunk):
       A = strictly-lower(beta_i k_i.k_j exp(gc_i - gc_j)),  T = (I + A)^-1,
       w = T (beta exp(gc) k)  [L, dk],   u = T (beta v)  [L, dv].
     T comes from the doubling product (I - A)(I + A^2)(I + A^4)... : A is strictly lower, so A^L = 0 and
     log2(L) squarings give the exact inverse with matrix-unit dots instead of a row-by-row solve
     (`Tiling.inverse="doubling"`: 10 dots of L^3, 2.6M multiply-adds per chunk). `inverse="blocked"`
     inverts the four 16 x 16 diagonal blocks by doubling and forms T one 16-row block at a time by block
     forward substitution (`_blocked_inverse`): 0.36M multiply-adds, 7x fewer, in smaller dots (the
     k k^T products, 0.5M, are the same either way).
  2. `_state_kernel`, sequential over chunks for each (batch, value head, dv block), the dk x BV state in
     registers: emits the chunk-start state h_n and v_new = u - w S, then
     S <- exp(gc_last) S + (k exp(gc_last - gc))^T v_new.
  3. `_output_kernel`, parallel over (batch, value head, chunk, dv block):
       o = (scale q exp(gc)) h_n + tril(scale q k^T exp(gc_i - gc_j)) v_new.
gc is the in-chunk cumulative sum of g (computed in jnp: [B, Hv, T], a few MB).

Fused pipelines (fewer passes over memory; the chunk states h and v_new never leave the chip):
  fuse="output": stage 1, then `_fused_kernel` = stages 2 and 3 in one sequential pass per (batch, value
     head, dv block): each chunk step also loads q and emits o = (scale q exp(gc)) S + tril(...) v_new.
  fuse="all": stage 1 emits only T [L, L] per chunk (`_wy_t`, half the bytes of w at dk = 128, a quarter
     of w + u); the sequential pass computes v_new = T (beta v - (beta exp(gc) k) S) from T, v and beta,
     then o and the state update as above. Bytes moved at 128k tokens / 64 heads (bf16): about 27 GB with
     three stages, about 11 GB fused (inputs, T and o; q/k/v re-read per dv block mostly from L2).
The sequential pass launches B * Hv * dv / bv programs; the fused forms pay off when that fills the GPU.
Default (`Tiling.fuse="auto"`): fuse="all" for bf16/fp16 inputs (1.10-1.24x the three stages on an H200 at
32k-128k tokens, 32/64 value heads), the three stages for fp32 inputs.

Numerics: the state, every accumulation and the gates are fp32. With bf16 inputs the intermediates
(w, u, v_new, h; T with fuse="all") are stored in bf16 and the matrix-unit dots take bf16 operands (as FLA does); the
inverse takes fp32 operands (tf32 dots): in bf16 its entries, products of exponentials, would keep 3
digits. With fp32 inputs everything is fp32 with exact-fp32 dots ("ieee"): 3e-7 from the jnp reference
on the H100 (docs/BENCHMARKS.md).

Triton wants power-of-two tiles: dk and dv are zero-padded to the next power of two (>= 16) when they are
not one (exact: zero key/value columns add nothing). Limits (NotImplementedError, caught by api.py for
kernels="auto"): dk <= 256, dv <= 512 (dv = 256 at dk = 128 is the `sequence` strategy's [v | 0]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import capture_chunks, unsort_captures

CHUNK = 64
f32 = jnp.float32

# jax 0.11.2 and 0.12 both name it CompilerParams; older releases said TritonCompilerParams.
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")


_INVERSES = ("doubling", "blocked")
_FUSES = ("auto", "none", "output", "all")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Launch parameters and kernel variants. bv_state / bv_out: dv block of the state (or fused
    state + output) and output kernels (powers of two); bv_state None picks it from the launch size
    (`_auto_bv_state`). inverse and fuse select the variants of the module docstring; every combination
    computes the same function (tests/test_gdn_variants.py)."""

    bv_state: int | None = None
    bv_out: int = 64
    warps_wy: int = 4
    warps_state: int = 4
    warps_out: int = 4
    stages_state: int = 3  # H100, T=32k, Hv=32: 2.17 ms vs 2.50 (2 stages), 2.80 (1)
    # Pipeline stages of the fused sequential pass (fuse="output"/"all"): None takes the most, up to
    # stages_state, that fit in shared memory by `_fused_stages`; a number is used as given.
    stages_fused: int | None = None
    inverse: str = "doubling"  # (I + A)^-1 in stage 1: "doubling" (64 x 64 products) or "blocked" (16 x 16)
    # "none" (3 stages), "output" (state + output fused), "all" (also w, u from T); "auto": "all" for 16-bit
    # inputs (H200, bf16, B=1, Hk=16: 1.10-1.24x the three stages at 32k-128k and 32/64 value heads,
    # docs/runs/2026-11-30-gdnvar5.txt), "none" for fp32 (its fused Triton compiles took over 100 s each).
    fuse: str = "auto"

    def __post_init__(self):
        if self.inverse not in _INVERSES:
            raise ValueError(f"Tiling.inverse={self.inverse!r}; expected one of {_INVERSES}")
        if self.fuse not in _FUSES:
            raise ValueError(f"Tiling.fuse={self.fuse!r}; expected one of {_FUSES}")
        if self.stages_fused is not None and self.stages_fused < 1:
            raise ValueError(f"Tiling.stages_fused={self.stages_fused!r}; expected None or >= 1")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_supported(dk: int, dv: int, hv: int, hk: int) -> None:
    if dk > 256:
        raise NotImplementedError(f"pallas GDN: dk={dk}; at most 256 (the state tile lives in registers)")
    if dv > 512:
        raise NotImplementedError(f"pallas GDN: dv={dv}; at most 512")
    if hv % hk:
        raise NotImplementedError(f"pallas GDN: Hv={hv} is not a multiple of Hk={hk}")


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


# Programs of the state pass wanted in flight: about one per SM (132 on an H100).
_STATE_PROGRAMS = 128


def _auto_bv_state(batch: int, hv: int, dv: int) -> int:
    """The widest dv block (64, else 32) that still launches _STATE_PROGRAMS sequential programs. Each dv
    block re-reads w and k, and each sequential step costs about the same latency whatever its width, so
    wider is better once the SMs are busy. H100 (docs/BENCHMARKS.md): Hv=64 at 32k/128k tokens 3.81/15.19
    ms with 64 vs 4.97/20.90 with 32; Hv=32 at 32k 2.50 ms with 32 vs 2.57 with 64 (64 programs only)."""
    return 64 if batch * hv * max(dv // 64, 1) >= _STATE_PROGRAMS else 32


def _dv_block(dv: int, want: int) -> int:
    """dv block: `want`, or dv itself when smaller (both powers of two)."""
    return min(dv, want)


def _dot(a, b, precision):
    return jnp.dot(a, b, preferred_element_type=f32, precision=precision)


def _dot_tn(a, b, precision):
    """a^T b without materialising the transpose outside the dot."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32, precision=precision)


def _dot_nt(a, b, precision):
    """a b^T."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32, precision=precision)


def _last(x):
    """x[-1] of a 1-D vector, written as a masked sum (Triton has no dynamic scalar extract)."""
    n = x.shape[0]
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (n,), 0) == n - 1, x, 0.0))


# ----------------------------------------------------------------------------------------------------
# Stage 1: WY transform per chunk.
# ----------------------------------------------------------------------------------------------------
def _unit_lower_inverse(neg_a, prec):
    """(I + A)^-1 for strictly lower A [n, n] (n a power of two), given -A, in fp32:
    sum_{j < n} (-A)^j = (I - A)(I + A^2)(I + A^4)...(I + A^(n/2))."""
    n = neg_a.shape[0]
    eye = (lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(f32)
    inv = eye + neg_a
    power = neg_a
    for _ in range(n.bit_length() - 2):  # n = 64: squarings to A^2 .. A^32
        power = _dot(power, power, prec)
        inv = inv + _dot(inv, power, prec)
    return inv


def _strict_a(k, gc, beta, prec):
    """A = strictly-lower(beta_i k_i.k_j exp(gc_i - gc_j)) of rows k [n, dk] among themselves, fp32."""
    n = k.shape[0]
    strict = lax.broadcasted_iota(jnp.int32, (n, n), 0) > lax.broadcasted_iota(jnp.int32, (n, n), 1)
    diff = jnp.where(strict, gc[:, None] - gc[None, :], 0.0)  # masked before exp: never overflows
    return jnp.where(strict, _dot_nt(k, k, prec) * beta[:, None] * jnp.exp(diff), 0.0)


_SUB = 16  # block of the blocked inverse (the smallest matrix-unit tile)


def _blocked_inverse(k_ref, gc_ref, beta_ref, prec):
    """T = (I + A)^-1 of one chunk, [L, L] fp32, built one 16-row block at a time (L / 16 blocks):
        T_i = D_i^-1 (E_i - A_i T),   D_i = I + A_ii (16 x 16, inverted by doubling),
    where E_i holds rows i of the identity, A_i [16, L] rows i of A, and T has its rows of the earlier
    blocks filled (later rows still 0, so A_i T sums only over the earlier blocks). Rows are read as ref
    windows (Triton cannot slice values); the finished rows go in with a select, not a concatenation."""
    L = CHUNK
    k, gc = k_ref[...], gc_ref[...]
    grow = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    r16 = lax.broadcasted_iota(jnp.int32, (_SUB, L), 0)
    c16 = lax.broadcasted_iota(jnp.int32, (_SUB, L), 1)
    t = jnp.zeros((L, L), f32)
    for i in range(L // _SUB):
        rows = pl.ds(i * _SUB, _SUB)
        ki, gci, bi = k_ref[rows, :], gc_ref[rows], beta_ref[rows]
        d_inv = _unit_lower_inverse(-_strict_a(ki, gci, bi, prec), prec)
        rhs = (c16 == r16 + i * _SUB).astype(f32)  # E_i
        if i:
            below = c16 < i * _SUB  # columns of the earlier blocks: A_i outside its diagonal block
            diff = jnp.where(below, gci[:, None] - gc[None, :], 0.0)
            a_off = jnp.where(below, _dot_nt(ki, k, prec) * bi[:, None] * jnp.exp(diff), 0.0)
            rhs = rhs - _dot(a_off, t, prec)
        t_i = _dot(d_inv, rhs, prec)  # [16, L]
        tiled = jnp.broadcast_to(t_i[None], (L // _SUB, _SUB, L)).reshape(L, L)
        t = jnp.where(grow // _SUB == i, tiled, t)
    return t


def _full_inverse(k_ref, gc_ref, beta_ref, prec, inverse):
    if inverse == "blocked":
        return _blocked_inverse(k_ref, gc_ref, beta_ref, prec)
    return _unit_lower_inverse(-_strict_a(k_ref[...], gc_ref[...], beta_ref[...], prec), prec)


def _wy_kernel(k_ref, v_ref, gc_ref, beta_ref, w_ref, u_ref, *, cdt, prec, inverse):
    inv_c = _full_inverse(k_ref, gc_ref, beta_ref, prec, inverse).astype(cdt)
    gc, beta = gc_ref[...], beta_ref[...]
    kb = (k_ref[...].astype(f32) * (beta * jnp.exp(gc))[:, None]).astype(cdt)
    w_ref[...] = _dot(inv_c, kb, prec).astype(w_ref.dtype)
    # u in column slices of at most 64: a [64, 256] fp32 accumulator (dv = 256, the `sequence` strategy)
    # spills, and with exact-fp32 dots ptxas then took minutes to compile the kernel.
    # Slices are taken from the refs: Triton lowers ref windows, not value slices.
    dv = v_ref.shape[1]
    cols = min(dv, 64)
    for j in range(dv // cols):
        sl = pl.ds(j * cols, cols)
        vb = (v_ref[:, sl].astype(f32) * beta[:, None]).astype(cdt)
        u_ref[:, sl] = _dot(inv_c, vb, prec).astype(u_ref.dtype)


def _wy(k, v, gc, beta, G, *, cdt, prec, tiling, interpret):
    B, Tp, Hk, dk = k.shape
    Hv, dv = v.shape[2:]
    N = Tp // CHUNK
    L = CHUNK
    kern = functools.partial(_wy_kernel, cdt=cdt, prec=prec, inverse=tiling.inverse)
    return pl.pallas_call(
        kern,
        grid=(B, Hv, N),
        in_specs=[
            pl.BlockSpec((None, L, None, dk), lambda b, h, n: (b, n, h // G, 0)),
            pl.BlockSpec((None, L, None, dv), lambda b, h, n: (b, n, h, 0)),
            pl.BlockSpec((None, None, L), lambda b, h, n: (b, h, n)),
            pl.BlockSpec((None, None, L), lambda b, h, n: (b, h, n)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, L, dk), lambda b, h, n: (b, h, n, 0)),
            pl.BlockSpec((None, None, L, dv), lambda b, h, n: (b, h, n, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, Hv, Tp, dk), cdt), jax.ShapeDtypeStruct((B, Hv, Tp, dv), cdt)],
        compiler_params=_CompilerParams(num_warps=tiling.warps_wy, num_stages=1),
        interpret=interpret,
        name="gdn_wy",
    )(k, v, gc, beta)


def _wy_t_kernel(k_ref, gc_ref, beta_ref, t_ref, *, prec, inverse):
    t_ref[...] = _full_inverse(k_ref, gc_ref, beta_ref, prec, inverse).astype(t_ref.dtype)


def _wy_t(k, gc, beta, G, *, cdt, prec, tiling, interpret):
    """Stage 1 of fuse="all": T = (I + A)^-1 per chunk, [B, Hv, Tp, L] in cdt (row block n = chunk n)."""
    B, Tp, Hk, dk = k.shape
    Hv = gc.shape[1]
    N = Tp // CHUNK
    L = CHUNK
    kern = functools.partial(_wy_t_kernel, prec=prec, inverse=tiling.inverse)
    return pl.pallas_call(
        kern,
        grid=(B, Hv, N),
        in_specs=[
            pl.BlockSpec((None, L, None, dk), lambda b, h, n: (b, n, h // G, 0)),
            pl.BlockSpec((None, None, L), lambda b, h, n: (b, h, n)),
            pl.BlockSpec((None, None, L), lambda b, h, n: (b, h, n)),
        ],
        out_specs=pl.BlockSpec((None, None, L, L), lambda b, h, n: (b, h, n, 0)),
        out_shape=jax.ShapeDtypeStruct((B, Hv, Tp, L), cdt),
        compiler_params=_CompilerParams(num_warps=tiling.warps_wy, num_stages=1),
        interpret=interpret,
        name="gdn_wy_t",
    )(k, gc, beta)


# Per-chunk math shared by the state, output and fused kernels.
def _causal_mask(L):
    """[L, L] bool, row >= column: which keys of a chunk each of its queries sees."""
    return lax.broadcasted_iota(jnp.int32, (L, L), 0) >= lax.broadcasted_iota(jnp.int32, (L, L), 1)


def _chunk_output(q, k, gc, h, vn, causal, *, scale, prec):
    """One chunk's output [L, BV] fp32: (scale q exp(gc)) h + tril(scale q k^T exp(gc_i - gc_j)) v_new.
    q, k [L, dk] and h [dk, BV] (the chunk-start state), vn [L, BV] in the compute dtype; gc [L] fp32."""
    cdt = h.dtype
    diff = jnp.where(causal, gc[:, None] - gc[None, :], 0.0)
    qk = jnp.where(causal, _dot_nt(q, k, prec) * (scale * jnp.exp(diff)), 0.0)
    qd = (q.astype(f32) * (scale * jnp.exp(gc))[:, None]).astype(cdt)
    return _dot(qd, h, prec) + _dot(qk.astype(cdt), vn, prec)


def _next_state(S, k, gc, vn, prec):
    """The state after one chunk: exp(gc_last) S + (k exp(gc_last - gc))^T v_new. S [dk, BV] fp32; k [L, dk]
    and vn [L, BV] in the compute dtype; gc [L] fp32."""
    g_last = _last(gc)
    kd = (k.astype(f32) * jnp.exp(g_last - gc)[:, None]).astype(vn.dtype)
    return S * jnp.exp(g_last) + _dot_tn(kd, vn, prec)


# ----------------------------------------------------------------------------------------------------
# Stage 2: sequential state pass.
# ----------------------------------------------------------------------------------------------------
def _state_kernel(*refs, num_chunks, prec, captures):
    # Refs (batch, head and dv block already selected by the BlockSpecs):
    # w [Tp, dk], u [Tp, BV], k [Tp, dk] (q/k head h // G), gc [Tp], s0 [dk, BV] f32, [cap [K] int32]
    # -> h [N, dk, BV], vn [Tp, BV], sT [dk, BV] f32, [caps [K, dk, BV] f32].
    w_ref, u_ref, k_ref, gc_ref, s0_ref = refs[:5]
    cap_ref = refs[5] if captures else None
    h_ref, vn_ref, sT_ref = refs[5 + bool(captures):8 + bool(captures)]
    caps_ref = refs[-1] if captures else None
    L = CHUNK
    cdt = w_ref.dtype

    def body(n, S):
        t = pl.ds(pl.multiple_of(n * L, L), L)
        h_ref[n] = S.astype(h_ref.dtype)
        w = w_ref[t, :]
        u = u_ref[t, :]
        kc = k_ref[t, :]
        gc = gc_ref[t]
        v_new = u.astype(f32) - _dot(w, S.astype(cdt), prec)
        vn_ref[t, :] = v_new.astype(vn_ref.dtype)
        return _next_state(S, kc, gc, v_new.astype(cdt), prec)

    sT_ref[...] = _run_chunks(body, s0_ref[...], num_chunks, cap_ref, caps_ref, captures)


def _run_chunks(body, S, num_chunks, cap_ref, caps_ref, captures):
    """`body` over chunks 0..num_chunks-1 from state S; with `captures`, the loop is cut at the ascending
    chunk indices in cap_ref (each in 0..num_chunks) and the state there is stored in caps_ref: no branch in
    the loop body, the same work."""
    lo = 0
    for i in range(captures):
        hi = cap_ref[i]
        S = lax.fori_loop(lo, hi, body, S)
        caps_ref[i] = S
        lo = hi
    return lax.fori_loop(lo, num_chunks, body, S)


def _state_pass(w, u, k, gc, s0, G, *, prec, tiling, interpret, cap=None):
    B, Hv, Tp, dk = w.shape
    dv = u.shape[-1]
    N = Tp // CHUNK
    K = 0 if cap is None else cap.shape[1]
    bv = _dv_block(dv, tiling.bv_state or _auto_bv_state(B, Hv, dv))
    kern = functools.partial(_state_kernel, num_chunks=N, prec=prec, captures=K)
    cap_spec = [pl.BlockSpec((None, K), lambda b, h, j: (b, 0))] if K else []
    caps_spec = [pl.BlockSpec((None, None, K, dk, bv), lambda b, h, j: (b, h, 0, 0, j))] if K else []
    return pl.pallas_call(
        kern,
        grid=(B, Hv, dv // bv),
        in_specs=[
            pl.BlockSpec((None, None, Tp, dk), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Tp, bv), lambda b, h, j: (b, h, 0, j)),
            pl.BlockSpec((None, Tp, None, dk), lambda b, h, j: (b, 0, h // G, 0)),
            pl.BlockSpec((None, None, Tp), lambda b, h, j: (b, h, 0)),
            pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j)),
        ] + cap_spec,
        out_specs=[
            pl.BlockSpec((None, None, N, dk, bv), lambda b, h, j: (b, h, 0, 0, j)),
            pl.BlockSpec((None, None, Tp, bv), lambda b, h, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j)),
        ] + caps_spec,
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, N, dk, dv), w.dtype),
            jax.ShapeDtypeStruct((B, Hv, Tp, dv), w.dtype),
            jax.ShapeDtypeStruct((B, Hv, dk, dv), f32),
        ] + ([jax.ShapeDtypeStruct((B, Hv, K, dk, dv), f32)] if K else []),
        compiler_params=_CompilerParams(num_warps=tiling.warps_state, num_stages=tiling.stages_state),
        interpret=interpret,
        name="gdn_state",
    )(w, u, k, gc, s0, *([] if cap is None else [cap]))


# ----------------------------------------------------------------------------------------------------
# Stage 3: outputs, parallel over chunks.
# ----------------------------------------------------------------------------------------------------
def _output_kernel(q_ref, k_ref, gc_ref, h_ref, vn_ref, o_ref, *, scale, prec):
    # q, k [L, dk], gc [L] f32, h [dk, BV], vn [L, BV]
    o = _chunk_output(q_ref[...], k_ref[...], gc_ref[...], h_ref[...], vn_ref[...], _causal_mask(CHUNK),
                      scale=scale, prec=prec)
    o_ref[...] = o.astype(o_ref.dtype)


def _outputs(q, k, gc, h, vn, G, out_dtype, *, scale, prec, tiling, interpret):
    B, Tp, Hk, dk = q.shape
    Hv, N, _, dv = h.shape[1:]
    L = CHUNK
    bv = _dv_block(dv, tiling.bv_out)
    kern = functools.partial(_output_kernel, scale=scale, prec=prec)
    return pl.pallas_call(
        kern,
        grid=(B, Hv, N, dv // bv),
        in_specs=[
            pl.BlockSpec((None, L, None, dk), lambda b, h, n, j: (b, n, h // G, 0)),
            pl.BlockSpec((None, L, None, dk), lambda b, h, n, j: (b, n, h // G, 0)),
            pl.BlockSpec((None, None, L), lambda b, h, n, j: (b, h, n)),
            pl.BlockSpec((None, None, None, dk, bv), lambda b, h, n, j: (b, h, n, 0, j)),
            pl.BlockSpec((None, None, L, bv), lambda b, h, n, j: (b, h, n, j)),
        ],
        out_specs=pl.BlockSpec((None, L, None, bv), lambda b, h, n, j: (b, n, h, j)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, Hv, dv), out_dtype),
        compiler_params=_CompilerParams(num_warps=tiling.warps_out, num_stages=1),
        interpret=interpret,
        name="gdn_output",
    )(q, k, gc, h, vn)


# ----------------------------------------------------------------------------------------------------
# Stages 2 + 3 fused: one sequential pass that emits the outputs (fuse="output" and fuse="all").
# ----------------------------------------------------------------------------------------------------
def _fused_kernel(*refs, num_chunks, scale, prec, from_t, captures):
    # Refs (batch, head and dv block selected by the BlockSpecs), Tp tokens, BV = dv block:
    #   from_t:  T [Tp, L], v [Tp, BV], beta [Tp]     else:  w [Tp, dk], u [Tp, BV]
    #   then q [Tp, dk], k [Tp, dk] (q/k head h // G), gc [Tp], s0 [dk, BV] f32, [cap [K] int32]
    #   -> o [Tp, BV], sT [dk, BV] f32, [caps [K, dk, BV] f32].
    head = 3 if from_t else 2
    q_ref, k_ref, gc_ref, s0_ref = refs[head:head + 4]
    cap_ref = refs[head + 4] if captures else None
    o_ref, sT_ref = refs[head + 4 + bool(captures):head + 6 + bool(captures)]
    caps_ref = refs[-1] if captures else None
    if from_t:
        t_ref, v_ref, beta_ref = refs[:3]
    else:
        w_ref, u_ref = refs[:2]
    L = CHUNK
    cdt = q_ref.dtype
    causal = _causal_mask(L)

    def body(n, S):
        t = pl.ds(pl.multiple_of(n * L, L), L)
        kc = k_ref[t, :]
        gc = gc_ref[t]
        Sc = S.astype(cdt)
        if from_t:
            beta = beta_ref[t]
            kb = (kc.astype(f32) * (beta * jnp.exp(gc))[:, None]).astype(cdt)
            r = v_ref[t, :].astype(f32) * beta[:, None] - _dot(kb, Sc, prec)
            v_new = _dot(t_ref[t, :], r.astype(cdt), prec)
        else:
            v_new = u_ref[t, :].astype(f32) - _dot(w_ref[t, :], Sc, prec)
        vn = v_new.astype(cdt)
        # Outputs: off the state's dependency chain, so they fill the chain's latency.
        o = _chunk_output(q_ref[t, :], kc, gc, Sc, vn, causal, scale=scale, prec=prec)
        o_ref[t, :] = o.astype(o_ref.dtype)
        return _next_state(S, kc, gc, vn, prec)

    sT_ref[...] = _run_chunks(body, s0_ref[...], num_chunks, cap_ref, caps_ref, captures)


# Shared memory a Triton program may use on Hopper (H100 / H200: 227 KiB opt-in per block), less a reserve
# for what the estimate leaves out (barriers, alignment; XLA's Triton asked 512 bytes more than Triton 3.8
# for the same kernels).
_SMEM_LIMIT = 227 * 1024
_SMEM_RESERVE = 4 * 1024


def _fused_smem_bytes(stages: int, *, from_t: bool, dk: int, bv: int, itemsize: int) -> int:
    """Upper estimate of the shared memory Triton gives `_fused_kernel` at `stages` pipeline stages.

    Triton's software pipeliner keeps stages - 1 copies of each chunk step's block loads in flight in
    shared memory: q, k [L, dk] and gc [L] (fp32), plus w [L, dk], u [L, bv] (fuse="output") or
    T [L, L], v [L, bv], beta [L] (fuse="all"), in the compute dtype. On top come the dot operands made in
    registers (S, q exp(gc), the masked q k^T, v_new, the decayed k), which go through shared memory on
    their way to the matrix units; Triton reuses that space between dots, so it is bounded by the largest
    pair of operands of one dot, plus a conversion of the fp32 state [dk, bv]. Checked against Triton
    3.8 compiling these kernels for sm_90 at dk = 128, bv 32 / 64, bf16 / fp32, 1-3 stages
    (tests/test_gdn_variants.py keeps the figures): the estimate is 11-32 KB above Triton's count from 2
    stages up. At 1 stage it is not an upper bound (no pipeline; Triton stages the loaded operands
    instead), but 1 stage is the floor and fits wherever the kernel does."""
    L = CHUNK
    loads = itemsize * L * (2 * dk + bv + (L if from_t else dk)) + 4 * L * (2 if from_t else 1)
    staging = itemsize * max(2 * L * dk, L * dk + dk * bv, L * L + L * bv) + 4 * dk * bv
    return (max(stages, 1) - 1) * loads + staging


def _fused_stages(tiling: Tiling, *, from_t: bool, dk: int, bv: int, itemsize: int) -> int:
    """num_stages of the fused pass: tiling.stages_fused when given, else the largest of
    tiling.stages_state, ..., 2 whose `_fused_smem_bytes` fits in _SMEM_LIMIT - _SMEM_RESERVE, else 1.
    dk = 128, bf16: 3 stages at bv 32 and 64. fp32: 2 (3 stages asked 241-297 KB of the 227 KB on an
    H200, docs/runs/2026-11-30-gdnvar.txt)."""
    if tiling.stages_fused is not None:
        return tiling.stages_fused
    for stages in range(tiling.stages_state, 1, -1):
        if _fused_smem_bytes(stages, from_t=from_t, dk=dk, bv=bv, itemsize=itemsize) <= _SMEM_LIMIT - _SMEM_RESERVE:
            return stages
    return 1


def _fused(first, q, k, gc, s0, G, out_dtype, *, v=None, beta=None, scale, prec, tiling, interpret, cap=None):
    """Sequential state pass that also emits o. `first` is (w, u) from `_wy`, or T from `_wy_t` (then v
    [B, Tp, Hv, dv] and beta [B, Hv, Tp] are needed). Returns (o [B, Tp, Hv, dv], final state f32), and with
    `cap` [B, K] (ascending chunk indices) the states there [B, Hv, K, dk, dv] f32."""
    B, Tp, Hk, dk = q.shape
    Hv, dv = s0.shape[1], s0.shape[3]
    N = Tp // CHUNK
    L = CHUNK
    bv = _dv_block(dv, tiling.bv_state or _auto_bv_state(B, Hv, dv))
    from_t = v is not None
    if from_t:
        head_in = [first, v, beta]
        head_specs = [
            pl.BlockSpec((None, None, Tp, L), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, Tp, None, bv), lambda b, h, j: (b, 0, h, j)),
            pl.BlockSpec((None, None, Tp), lambda b, h, j: (b, h, 0)),
        ]
    else:
        head_in = list(first)
        head_specs = [
            pl.BlockSpec((None, None, Tp, dk), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Tp, bv), lambda b, h, j: (b, h, 0, j)),
        ]
    K = 0 if cap is None else cap.shape[1]
    kern = functools.partial(_fused_kernel, num_chunks=N, scale=scale, prec=prec, from_t=from_t, captures=K)
    stages = _fused_stages(tiling, from_t=from_t, dk=dk, bv=bv, itemsize=jnp.dtype(q.dtype).itemsize)
    return pl.pallas_call(
        kern,
        grid=(B, Hv, dv // bv),
        in_specs=head_specs + [
            pl.BlockSpec((None, Tp, None, dk), lambda b, h, j: (b, 0, h // G, 0)),
            pl.BlockSpec((None, Tp, None, dk), lambda b, h, j: (b, 0, h // G, 0)),
            pl.BlockSpec((None, None, Tp), lambda b, h, j: (b, h, 0)),
            pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j)),
        ] + ([pl.BlockSpec((None, K), lambda b, h, j: (b, 0))] if K else []),
        out_specs=[
            pl.BlockSpec((None, Tp, None, bv), lambda b, h, j: (b, 0, h, j)),
            pl.BlockSpec((None, None, dk, bv), lambda b, h, j: (b, h, 0, j)),
        ] + ([pl.BlockSpec((None, None, K, dk, bv), lambda b, h, j: (b, h, 0, 0, j))] if K else []),
        out_shape=[jax.ShapeDtypeStruct((B, Tp, Hv, dv), out_dtype), jax.ShapeDtypeStruct((B, Hv, dk, dv), f32)]
        + ([jax.ShapeDtypeStruct((B, Hv, K, dk, dv), f32)] if K else []),
        compiler_params=_CompilerParams(num_warps=tiling.warps_state, num_stages=stages),
        interpret=interpret,
        name="gdn_state_output",
    )(*head_in, q, k, gc, s0, *([] if cap is None else [cap]))


# ----------------------------------------------------------------------------------------------------
# Public entry.
# ----------------------------------------------------------------------------------------------------
def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None, *, tiling: Tiling = Tiling(),
                           interpret: bool = False, capture=None):
    """Same contract as reference.chunk_gated_delta_rule (chunk size fixed at 64), `capture` included.

    Returns (o [B, T, Hv, dv] in v's dtype, final_state [B, Hv, dk, dv] fp32) and with `capture` the captured
    states. The sequential pass is cut at the captured chunk boundaries (reference.capture_chunks) and stores
    the state there, in fp32, with no branch in its loop. `interpret=True` runs the same kernels through the
    Pallas interpreter (CPU tests)."""
    B, T, Hk, dk = k.shape
    Hv, dv = v.shape[2:]
    check_supported(dk, dv, Hv, Hk)
    G = Hv // Hk
    scale = dk**-0.5 if scale is None else float(scale)
    s0 = jnp.zeros((B, Hv, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
    dk_p, dv_p = _pow2_at_least_16(dk), _pow2_at_least_16(dv)
    if (dk_p, dv_p) != (dk, dv):
        padl = lambda a, n: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])])
        q, k, v = padl(q, dk_p), padl(k, dk_p), padl(v, dv_p)
        s0 = jnp.pad(s0, [(0, 0), (0, 0), (0, dk_p - dk), (0, dv_p - dv)])
    exact = q.dtype == f32 and k.dtype == f32 and v.dtype == f32
    cdt = f32 if exact else jnp.bfloat16
    # fp32 inputs: exact-fp32 dots everywhere. bf16: bf16 operands, except the inverse (fp32 -> tf32).
    prec = lax.Precision.HIGHEST if exact else lax.Precision.DEFAULT
    out_dtype = v.dtype
    q, k, v = (x.astype(cdt) for x in (q, k, v))

    L = CHUNK
    pad = (-T) % L
    if pad:
        padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        q, k, v, g, beta = map(padt, (q, k, v, g, beta))
    Tp = T + pad
    N = Tp // L
    gc = jnp.cumsum(g.astype(f32).reshape(B, N, L, Hv), axis=2).reshape(B, Tp, Hv)
    gc = jnp.transpose(gc, (0, 2, 1))  # [B, Hv, Tp]: one contiguous row per head for the kernels
    bt = jnp.transpose(beta.astype(f32), (0, 2, 1))

    if tiling.fuse == "auto":
        tiling = dataclasses.replace(tiling, fuse="none" if exact else "all")
    cap, order = (None, None) if capture is None else capture_chunks(capture, N)
    kw = dict(prec=prec, tiling=tiling, interpret=interpret, cap=cap)
    if tiling.fuse == "all":
        tmat = _wy_t(k, gc, bt, G, cdt=cdt, prec=prec, tiling=tiling, interpret=interpret)
        o, sT, *caps = _fused(tmat, q, k, gc, s0, G, out_dtype, v=v, beta=bt, scale=scale, **kw)
    elif tiling.fuse == "output":
        wu = _wy(k, v, gc, bt, G, cdt=cdt, prec=prec, tiling=tiling, interpret=interpret)
        o, sT, *caps = _fused(wu, q, k, gc, s0, G, out_dtype, scale=scale, **kw)
    else:
        w, u = _wy(k, v, gc, bt, G, cdt=cdt, prec=prec, tiling=tiling, interpret=interpret)
        h, vn, sT, *caps = _state_pass(w, u, k, gc, s0, G, **kw)
        o = _outputs(q, k, gc, h, vn, G, out_dtype, scale=scale, prec=prec, tiling=tiling, interpret=interpret)
    if capture is None:
        return o[:, :T, :, :dv], sT[:, :, :dk, :dv]
    captured = jnp.moveaxis(caps[0], 2, 1)[..., :dk, :dv]  # [B, K, Hv, dk, dv] in ascending chunk order
    return o[:, :T, :, :dv], sT[:, :, :dk, :dv], unsort_captures(captured, order, capture)

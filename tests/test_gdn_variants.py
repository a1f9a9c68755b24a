"""Variants of the Pallas GDN forward (kernels/gdn/pallas_gpu.py `Tiling.inverse`, `Tiling.fuse`) on CPU.

Every variant runs through the Pallas interpreter (outputs start as NaN, so an unwritten element fails)
and is compared with the token-by-token jnp recurrence in fp32: relative L2 error <= 1e-5 (fp32
arithmetic throughout; measured ~4e-7). Stage 1's inverse is checked on its own against
jnp.linalg.inv, and every variant is lowered to Triton IR for an H100 (catches Triton-only restrictions
that the interpreter does not), the fused pass at the pipeline stages `_fused_stages` picks; that
choice's shared memory estimate is held against Triton's own figures.
"""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import pytest

from pcp_jax.kernels.gdn import pallas_gpu, reference
from test_kernels_gpu_interpret import LOWERING_CASES, LOWERING_DK, _gdn_inputs, _gdn_lowering_args, _lower_for_h100, _rel

RTOL = 1e-5
VARIANTS = list(itertools.product(pallas_gpu._INVERSES, [f for f in pallas_gpu._FUSES if f != "auto"]))


@pytest.mark.parametrize("inverse,fuse", VARIANTS)
def test_variant_matches_recurrence(inverse, fuse):
    # B = 2, T not a multiple of 64, GQA, dv = 48 padded to 64 and split in two dv blocks of 32.
    q, k, v, g, beta, s0 = _gdn_inputs(21, 2, 150, 2, 2, 32, 48)
    tiling = pallas_gpu.Tiling(inverse=inverse, fuse=fuse, bv_state=32)
    o, s = pallas_gpu.chunk_gated_delta_rule(q, k, v, g, beta, s0, tiling=tiling, interpret=True)
    o_ref, s_ref = reference.naive_gated_delta_rule(q, k, v, g, beta, s0)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape and s.dtype == jnp.float32
    assert not bool(jnp.isnan(o).any()) and not bool(jnp.isnan(s).any()), "unwritten (poisoned) elements"
    assert _rel(o, o_ref) <= RTOL and _rel(s, s_ref) <= RTOL


@pytest.mark.parametrize("fuse", ["output", "all"])
def test_fused_without_initial_state_and_wide_values(fuse):
    """No initial state, G = 3, dv = 2 dk (the `sequence` strategy's [v | 0] shape) in one dv block."""
    q, k, v, g, beta, _ = _gdn_inputs(5, 1, 100, 1, 3, 16, 32, with_state=False)
    tiling = pallas_gpu.Tiling(inverse="blocked", fuse=fuse, bv_state=64)
    o, s = pallas_gpu.chunk_gated_delta_rule(q, k, v, g, beta, tiling=tiling, interpret=True)
    o_ref, s_ref = reference.naive_gated_delta_rule(q, k, v, g, beta)
    assert _rel(o, o_ref) <= RTOL and _rel(s, s_ref) <= RTOL


def _chunk_inverse_jnp(k, gc, beta, G):
    """(I + A)^-1 per chunk from the definition: [B, Hv, Tp, L] like `_wy_t`'s output."""
    B, Tp, Hk, dk = k.shape
    Hv = gc.shape[1]
    L = pallas_gpu.CHUNK
    kc = jnp.repeat(k, G, axis=2).reshape(B, Tp // L, L, Hv, dk)
    kk = jnp.einsum("bnihd,bnjhd->bhnij", kc, kc, precision="highest")
    gcc = gc.reshape(B, Hv, Tp // L, L)
    strict = jnp.tril(jnp.ones((L, L), bool), -1)
    diff = jnp.where(strict, gcc[..., :, None] - gcc[..., None, :], 0.0)
    a = jnp.where(strict, kk * beta.reshape(B, Hv, Tp // L, L)[..., None] * jnp.exp(diff), 0.0)
    return jnp.linalg.inv(jnp.eye(L) + a).reshape(B, Hv, Tp, L)


@pytest.mark.parametrize("inverse", pallas_gpu._INVERSES)
def test_stage1_inverse_and_wy(inverse):
    """Stage 1 alone: T of `_wy_t` equals the inverse from its definition (zero above the diagonal), and
    `_wy`'s w, u are the same with either inverse."""
    q, k, v, g, beta, _ = _gdn_inputs(9, 1, 128, 1, 2, 32, 32)
    B, T, Hk, dk = k.shape
    Hv = v.shape[2]
    L = pallas_gpu.CHUNK
    gc = jnp.cumsum(g.reshape(B, T // L, L, Hv), axis=2).reshape(B, T, Hv).transpose(0, 2, 1)
    bt = beta.transpose(0, 2, 1)
    kw = dict(cdt=jnp.float32, prec=jax.lax.Precision.HIGHEST, interpret=True)
    t = pallas_gpu._wy_t(k, gc, bt, 2, tiling=pallas_gpu.Tiling(inverse=inverse), **kw)
    t_ref = _chunk_inverse_jnp(k, gc, bt, 2)
    assert not bool(jnp.isnan(t).any()) and _rel(t, t_ref) <= RTOL
    upper = jnp.triu(jnp.ones((L, L), bool), 1)
    assert bool(jnp.all(t.reshape(B, Hv, T // L, L, L)[..., upper] == 0.0))
    w, u = pallas_gpu._wy(k, v, gc, bt, 2, tiling=pallas_gpu.Tiling(inverse=inverse), **kw)
    w0, u0 = pallas_gpu._wy(k, v, gc, bt, 2, tiling=pallas_gpu.Tiling(), **kw)
    assert not bool(jnp.isnan(w).any()) and not bool(jnp.isnan(u).any())
    assert _rel(w, w0) <= RTOL and _rel(u, u0) <= RTOL


# Shared memory (bytes) Triton 3.8 allocated for `_fused_kernel` compiled for sm_90 (num_warps 4 and 8 gave
# the same), dk = dv = 128: (itemsize, from_t, bv, stages) -> bytes. XLA's Triton on the H200 asked 512
# bytes more for three of these (272896, 241152, 265728: docs/runs/2026-11-30-gdnvar.txt).
TRITON_SMEM = {
    (2, False, 32, 2): 91136, (2, False, 32, 3): 145408, (2, False, 64, 2): 99328, (2, False, 64, 3): 157696,
    (2, True, 32, 2): 75264, (2, True, 32, 3): 121856, (2, True, 64, 2): 83456, (2, True, 64, 3): 134144,
    (4, False, 32, 2): 164864, (4, False, 32, 3): 272384, (4, False, 64, 2): 181248, (4, False, 64, 3): 296960,
    (4, True, 32, 2): 148992, (4, True, 32, 3): 240640, (4, True, 64, 2): 165376, (4, True, 64, 3): 265216,
}


@pytest.mark.parametrize("key", sorted(TRITON_SMEM))
def test_fused_smem_estimate_bounds_triton(key):
    itemsize, from_t, bv, stages = key
    est = pallas_gpu._fused_smem_bytes(stages, from_t=from_t, dk=128, bv=bv, itemsize=itemsize)
    assert TRITON_SMEM[key] + 512 <= est <= TRITON_SMEM[key] + 40 * 1024


def test_fused_stages_choice():
    pick = lambda itemsize, from_t, bv, **kw: pallas_gpu._fused_stages(
        pallas_gpu.Tiling(**kw), from_t=from_t, dk=128, bv=bv, itemsize=itemsize)
    for from_t in (False, True):
        for bv in (32, 64):
            assert pick(2, from_t, bv) == 3  # bf16: what the state pass uses
            assert pick(4, from_t, bv) == 2  # fp32: 3 stages overflowed on the H200
            # every automatic choice fits what the H200 offers, with XLA's 512 bytes on top
            for itemsize in (2, 4):
                s = pick(itemsize, from_t, bv)
                assert TRITON_SMEM[(itemsize, from_t, bv, s)] + 512 <= pallas_gpu._SMEM_LIMIT
            assert pick(2, from_t, bv, stages_state=2) == 2
            assert pick(4, from_t, bv, stages_fused=3) == 3  # explicit: used as given
    with pytest.raises(ValueError, match="stages_fused=0"):
        pallas_gpu.Tiling(stages_fused=0)


def test_tiling_rejects_unknown_variants():
    with pytest.raises(ValueError, match="inverse='lu'"):
        pallas_gpu.Tiling(inverse="lu")
    with pytest.raises(ValueError, match="fuse='yes'"):
        pallas_gpu.Tiling(fuse="yes")


@pytest.mark.parametrize("dtype,T,dv", LOWERING_CASES)
def test_variants_lower_to_triton(dtype, T, dv):
    args, dk = _gdn_lowering_args(dtype, T, dv), LOWERING_DK
    itemsize = 4 if dtype == jnp.float32 else 2
    for inverse, fuse in VARIANTS:
        for bv, stages_fused in ((32, None), (64, None), (64, 1), (32, 2)):
            if fuse == "none" and stages_fused is not None:
                continue
            tiling = pallas_gpu.Tiling(inverse=inverse, fuse=fuse, bv_state=bv, stages_fused=stages_fused)
            fn = functools.partial(pallas_gpu.chunk_gated_delta_rule, tiling=tiling)
            text = _lower_for_h100(fn, *args)
            assert text.count("__gpu$xla.gpu.triton") == (3 if fuse == "none" else 2)
            if fuse != "none":  # the fused pass runs at the chosen stages (the stage 1 kernel at 1)
                bv_eff = min(bv, pallas_gpu._pow2_at_least_16(dv))
                want = stages_fused or pallas_gpu._fused_stages(
                    tiling, from_t=fuse == "all", dk=dk, bv=bv_eff, itemsize=itemsize)
                fused = text[text.index('name = "gdn_state_output"'):]
                assert re.search(r"num_stages = (\d+) : i32", fused).group(1) == str(want)



@pytest.mark.parametrize("fuse", ["none", "output", "all"])
def test_captured_states_equal_the_reference(fuse):
    """Each pipeline cuts its sequential pass at the captured chunks: the states there (fp32) equal the jnp
    reference's, in the order asked, -1 giving zeros, and the outputs are unchanged."""
    q, k, v, g, beta, s0 = _gdn_inputs(31, 2, 300, 2, 2, 32, 48)
    capture = jnp.array([[256, 64], [-1, 320]], jnp.int32)
    tiling = pallas_gpu.Tiling(fuse=fuse, bv_state=32)
    o, s, kept = pallas_gpu.chunk_gated_delta_rule(q, k, v, g, beta, s0, tiling=tiling, interpret=True,
                                                   capture=capture)
    o_ref, s_ref, kept_ref = reference.chunk_gated_delta_rule(q, k, v, g, beta, s0, capture=capture)
    assert kept.shape == kept_ref.shape and kept.dtype == jnp.float32
    assert not bool(jnp.isnan(kept).any()), "unwritten (poisoned) elements"
    assert _rel(o, o_ref) <= RTOL and _rel(s, s_ref) <= RTOL and _rel(kept, kept_ref) <= RTOL
    assert not bool(jnp.any(kept[1, 0]))


def test_capturing_variant_lowers_to_triton():
    """The capturing fused pass (bf16, the GPU default) lowers to Triton for an H100."""
    dtype, T, dv = LOWERING_CASES[0]
    args = _gdn_lowering_args(dtype, T, dv)
    capture = jax.ShapeDtypeStruct((args[0].shape[0], 2), jnp.int32)
    text = _lower_for_h100(lambda *a: pallas_gpu.chunk_gated_delta_rule(*a[:-1], capture=a[-1]), *args, capture)
    assert text.count("__gpu$xla.gpu.triton") == 2  # the WY inverse and the (cut) fused pass

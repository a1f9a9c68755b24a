"""Variants of the Pallas GDN forward (kernels/gdn/pallas_gpu.py `Tiling.inverse`, `Tiling.fuse`) on CPU.

Every variant runs through the Pallas interpreter (outputs start as NaN, so an unwritten element fails)
and is compared with the token-by-token jnp recurrence in fp32: relative L2 error <= 1e-5 (fp32
arithmetic throughout; measured ~4e-7). Stage 1's inverse is checked on its own against
jnp.linalg.inv, and every variant is lowered to Triton IR for an H100 (catches Triton-only restrictions
that the interpreter does not).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from pcp_jax.kernels.gdn import pallas_gpu, reference
from test_kernels_gpu_interpret import _gdn_inputs, _lower_for_h100, _rel

RTOL = 1e-5
VARIANTS = list(itertools.product(pallas_gpu._INVERSES, pallas_gpu._FUSES))


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


def test_tiling_rejects_unknown_variants():
    with pytest.raises(ValueError, match="inverse='lu'"):
        pallas_gpu.Tiling(inverse="lu")
    with pytest.raises(ValueError, match="fuse='yes'"):
        pallas_gpu.Tiling(fuse="yes")


@pytest.mark.parametrize("dtype,T,dv", [(jnp.bfloat16, 8192, 128), (jnp.float32, 200, 256), (jnp.bfloat16, 100, 48)])
def test_variants_lower_to_triton(dtype, T, dv):
    S = jax.ShapeDtypeStruct
    B, Hk, G, dk = 1, 2, 2, 128
    args = (S((B, T, Hk, dk), dtype), S((B, T, Hk, dk), dtype), S((B, T, Hk * G, dv), dtype),
            S((B, T, Hk * G), jnp.float32), S((B, T, Hk * G), jnp.float32), S((B, Hk * G, dk, dv), jnp.float32))
    for inverse, fuse in VARIANTS:
        for bv in (32, 64):
            tiling = pallas_gpu.Tiling(inverse=inverse, fuse=fuse, bv_state=bv)
            fn = functools.partial(pallas_gpu.chunk_gated_delta_rule, tiling=tiling)
            assert _lower_for_h100(fn, *args).count("__gpu$xla.gpu.triton") == (3 if fuse == "none" else 2)

"""GPU kernels checked on CPU.

- The Pallas GDN kernels (kernels/gdn/pallas_gpu.py) run through the Pallas interpreter (`interpret=True`)
  and are compared with the token-by-token jnp recurrence, fp32, fresh random inputs each test.
  Tolerance: relative L2 error <= 1e-5 (fp32 arithmetic throughout; measured ~4e-7).
  The interpreter creates every kernel output filled with NaN (checked by a test below), so an element
  that no kernel program writes stays NaN and fails; each stage's intermediates are checked too.
- The same kernels are lowered for an H100 (Triton IR) on CPU, which catches Triton-only restrictions
  (power-of-two tiles, unsupported primitives) that the interpreter does not.
- The position analysis of the tokamax attention wrapper (which mask form describes the visible keys) is
  pure jnp and is checked against the reference's visibility rule. The tokamax kernels themselves need a
  Hopper GPU: benchmarks/attention.py checks them there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax.kernels.attention import tokamax_gpu as att_gpu
from pcp_jax.kernels.gdn import pallas_gpu, reference

RTOL = 1e-5


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))


def _gdn_inputs(seed, B, T, Hk, G, dk, dv, with_state=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, Hk, dk)))
    k = unit(jax.random.normal(ks[1], (B, T, Hk, dk)))
    v = jax.random.normal(ks[2], (B, T, Hk * G, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hk * G))) * 0.5
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hk * G)))
    s0 = jax.random.normal(ks[5], (B, Hk * G, dk, dv)) * 0.1 if with_state else None
    return q, k, v, g, beta, s0


def test_interpreter_poisons_outputs():
    """The tests below rely on the Pallas interpreter creating every output buffer filled with NaN, so an
    element that no kernel program writes stays NaN. Guard that assumption."""
    from jax.experimental import pallas as pl

    def writes_half(o_ref):
        o_ref[:4] = jnp.zeros((4,), jnp.float32)

    out = pl.pallas_call(writes_half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True)()
    assert bool(jnp.all(out[:4] == 0)) and bool(jnp.all(jnp.isnan(out[4:])))


@pytest.mark.parametrize(
    "B,T,Hk,G,dk,dv,with_state",
    [
        (1, 128, 1, 1, 32, 32, True),  # two whole chunks
        (2, 150, 2, 2, 32, 48, True),  # T not a multiple of 64; GQA; dv not a power of two (padded)
        (1, 64, 1, 3, 16, 64, False),  # one chunk, G = 3, no initial state
        (1, 100, 1, 2, 32, 64, True),  # dv = 2 dk (the `sequence` strategy's [v | 0] shape, scaled down)
    ],
)
def test_pallas_gdn_interpret_matches_recurrence(B, T, Hk, G, dk, dv, with_state):
    q, k, v, g, beta, s0 = _gdn_inputs(B * 1000 + T + dv, B, T, Hk, G, dk, dv, with_state)
    o, s = pallas_gpu.chunk_gated_delta_rule(q, k, v, g, beta, s0, interpret=True)
    o_ref, s_ref = reference.naive_gated_delta_rule(q, k, v, g, beta, s0)
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert s.shape == s_ref.shape and s.dtype == jnp.float32
    assert not bool(jnp.isnan(o).any()) and not bool(jnp.isnan(s).any()), "unwritten (poisoned) elements"
    assert _rel(o, o_ref) <= RTOL
    assert _rel(s, s_ref) <= RTOL


def test_pallas_gdn_stages_write_everything():
    """Every intermediate of every stage is fully written (the interpreter starts them as NaN)."""
    q, k, v, g, beta, s0 = _gdn_inputs(7, 1, 192, 1, 2, 16, 32)
    cdt = jnp.float32
    B, T, Hk, dk = k.shape
    Hv, dv = v.shape[2:]
    L = pallas_gpu.CHUNK
    gc = jnp.cumsum(g.reshape(B, T // L, L, Hv), axis=2).reshape(B, T, Hv).transpose(0, 2, 1)
    bt = beta.transpose(0, 2, 1)
    t = pallas_gpu.Tiling(bv_state=16, bv_out=16)
    prec = jax.lax.Precision.HIGHEST
    w, u = pallas_gpu._wy(k, v, gc, bt, 2, cdt=cdt, prec=prec, tiling=t, interpret=True)
    h, vn, sT = pallas_gpu._state_pass(w, u, k, gc, s0, 2, prec=prec, tiling=t, interpret=True)
    o = pallas_gpu._outputs(q, k, gc, h, vn, 2, jnp.float32, scale=dk**-0.5, prec=prec, tiling=t, interpret=True)
    for name, x in dict(w=w, u=u, h=h, v_new=vn, final=sT, o=o).items():
        assert not bool(jnp.isnan(x).any()), f"{name} has unwritten elements"
    o_ref, s_ref = reference.naive_gated_delta_rule(q, k, v, g, beta, s0)
    assert _rel(o, o_ref) <= RTOL and _rel(sT, s_ref) <= RTOL


def test_pallas_gdn_wide_state_block_interpret():
    """The 64-column state block that the launch heuristic picks for many heads (Hv * dv / 64 >= 128)."""
    q, k, v, g, beta, s0 = _gdn_inputs(13, 1, 130, 1, 2, 32, 128)
    o, s = pallas_gpu.chunk_gated_delta_rule(q, k, v, g, beta, s0, tiling=pallas_gpu.Tiling(bv_state=64),
                                             interpret=True)
    o_ref, s_ref = reference.naive_gated_delta_rule(q, k, v, g, beta, s0)
    assert _rel(o, o_ref) <= RTOL and _rel(s, s_ref) <= RTOL
    assert pallas_gpu._auto_bv_state(1, 64, 128) == 64 and pallas_gpu._auto_bv_state(1, 32, 128) == 32


def test_pallas_gdn_padding_tokens_leave_state_unchanged():
    """Tokens with g = beta = 0 appended to a sequence change neither its outputs nor its final state."""
    q, k, v, g, beta, s0 = _gdn_inputs(11, 1, 70, 1, 2, 32, 32)
    o1, s1 = pallas_gpu.chunk_gated_delta_rule(q, k, v, g, beta, s0, interpret=True)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, 30)] + [(0, 0)] * (a.ndim - 2))
    o2, s2 = pallas_gpu.chunk_gated_delta_rule(pad(q), pad(k), pad(v), pad(g), pad(beta), s0, interpret=True)
    assert _rel(o2[:, :70], o1) <= RTOL and _rel(s2, s1) <= RTOL


def _lower_for_h100(fn, *args):
    """Lower `fn` for CUDA on this CPU-only machine, pretending the GPU is an H100 (Triton IR only)."""
    try:
        from jax._src.pallas.triton import gpu_info as gi
        from jax._src.pallas.triton import pallas_call_registration as reg
    except ImportError as e:  # private modules: skip rather than fail when jax moves them
        pytest.skip(f"Pallas Triton internals moved: {e}")
    saved = reg.gpu_info_lib.get_gpu_info
    reg.gpu_info_lib.get_gpu_info = lambda: gi.get_gpu_info_from_version(gi.GpuVersion.H100)
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        reg.gpu_info_lib.get_gpu_info = saved


LOWERING_CASES = [(jnp.bfloat16, 8192, 128), (jnp.float32, 200, 256), (jnp.bfloat16, 100, 48)]  # dtype, T, dv
LOWERING_DK = 128


def _gdn_lowering_args(dtype, T, dv):
    """Abstract GDN inputs (q, k, v, g, beta, initial state) for lowering: B=1, Hk=2, G=2, dk=LOWERING_DK."""
    S = jax.ShapeDtypeStruct
    B, Hk, G, dk = 1, 2, 2, LOWERING_DK
    return (S((B, T, Hk, dk), dtype), S((B, T, Hk, dk), dtype), S((B, T, Hk * G, dv), dtype),
            S((B, T, Hk * G), jnp.float32), S((B, T, Hk * G), jnp.float32), S((B, Hk * G, dk, dv), jnp.float32))


@pytest.mark.parametrize("dtype,T,dv", LOWERING_CASES)
def test_pallas_gdn_lowers_to_triton(dtype, T, dv):
    """The default tiling lowers: two kernels (WY inverse, fused state + output pass) for 16-bit inputs,
    the three stages for fp32 (`Tiling.fuse="auto"`)."""
    args = _gdn_lowering_args(dtype, T, dv)
    kernels = 3 if dtype == jnp.float32 else 2
    for tiling in (pallas_gpu.Tiling(), pallas_gpu.Tiling(bv_state=64)):
        fn = functools.partial(pallas_gpu.chunk_gated_delta_rule, tiling=tiling)
        assert _lower_for_h100(fn, *args).count("__gpu$xla.gpu.triton") == kernels


def _visible(q_pos, k_pos, causal):
    vis = (k_pos >= 0)[:, None, :]
    if causal:
        vis = vis & (k_pos[:, None, :] <= q_pos[:, :, None])
    return jnp.broadcast_to(vis, (q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]))


def _layouts():
    """(name, q_pos, k_pos, causal, expected path) covering every path of the tokamax wrapper."""
    ar = lambda a, n: jnp.arange(a, a + n, dtype=jnp.int32)[None]
    rng = np.random.default_rng(0)
    shuffled = jnp.asarray(rng.permutation(64).astype(np.int32))[None]
    with_hole = ar(0, 64).at[0, 10].set(-1)
    padded = jnp.concatenate([ar(128, 48), -jnp.ones((1, 16), jnp.int32)], axis=1)
    return [
        ("diagonal", ar(64, 64), ar(64, 64), True, "causal"),
        ("unmasked", ar(128, 64), ar(0, 64), False, "plain"),
        ("earlier_keys_causal", ar(128, 64), ar(0, 64), True, "plain"),
        ("later_keys_causal", ar(0, 64), ar(128, 64), True, "empty"),
        ("padded_keys", ar(160, 64), padded, True, "range"),
        ("padded_keys_noncausal", ar(0, 64), padded, False, "range"),
        ("decode_cache", ar(40, 1), jnp.concatenate([ar(0, 41), -jnp.ones((1, 23), jnp.int32)], 1), True, "range"),
        ("shuffled", ar(0, 64), shuffled, True, "dense"),
        ("hole", ar(0, 64), with_hole, False, "dense"),
        ("offset_diagonal", ar(32, 64), ar(0, 64), True, "range"),
    ]


@pytest.mark.parametrize("name,q_pos,k_pos,causal,expected", _layouts(), ids=[x[0] for x in _layouts()])
def test_attention_path_choice_is_exact(name, q_pos, k_pos, causal, expected):
    """The mask form the wrapper picks describes exactly the reference's visible set."""
    k_start, k_end, exact = att_gpu._key_ranges(q_pos, k_pos, causal)
    path = att_gpu.PATHS[int(att_gpu._choose_path(q_pos, k_pos, causal, exact))]
    assert path == expected
    vis = _visible(q_pos, k_pos, causal)
    Tk = k_pos.shape[1]
    j = jnp.arange(Tk)[None, None]
    if path == "range":
        assert bool(jnp.all(vis == ((j >= k_start[..., None]) & (j < k_end[..., None]))))
    elif path == "plain":
        assert bool(jnp.all(vis))
    elif path == "empty":
        assert not bool(jnp.any(vis))
    elif path == "causal":
        assert bool(jnp.all(vis == (j <= jnp.arange(q_pos.shape[1])[None, :, None])))
    else:
        assert not bool(exact) or path == "dense"


def test_api_falls_back_for_unsupported_inputs_only_under_auto(monkeypatch):
    """On a GPU backend, an input the GPU kernel rejects (NotImplementedError) runs the reference with
    kernels="auto" and raises with kernels="gpu". Exercised on CPU by pretending the backend is a GPU; the
    inputs are rejected before any kernel or tokamax import."""
    from pcp_jax.kernels.attention import api as att_api
    from pcp_jax.kernels.attention import reference as att_ref
    from pcp_jax.kernels.gdn import api as gdn_api
    from pcp_jax.kernels.moe import api as moe_api
    from pcp_jax.kernels.moe import reference as moe_ref

    for mod in (gdn_api, att_api, moe_api):
        monkeypatch.setattr(mod, "use_gpu_kernels", lambda kernels: kernels != "jnp")

    q, k, v, g, beta, s0 = _gdn_inputs(3, 1, 8, 1, 1, 512, 16)  # dk = 512: over the kernel's limit
    o, s = gdn_api.gated_delta_rule(q, k, v, g, beta, s0, kernels="auto")
    o_ref, s_ref = reference.chunk_gated_delta_rule(q, k, v, g, beta, s0)
    assert _rel(o, o_ref) == 0.0 and _rel(s, s_ref) == 0.0
    with pytest.raises(NotImplementedError, match="dk=512"):
        gdn_api.gated_delta_rule(q, k, v, g, beta, s0, kernels="gpu")

    qa = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 2, 16))  # fp32: the tokamax kernel takes bf16
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    out, lse = att_api.attention_block(qa, qa[:, :, :1], qa[:, :, :1], pos, pos, kernels="auto")
    out_ref, lse_ref = att_ref.attention_block(qa, qa[:, :, :1], qa[:, :, :1], pos, pos)
    assert _rel(out, out_ref) == 0.0 and _rel(lse, lse_ref) == 0.0
    with pytest.raises(NotImplementedError, match="bf16"):
        att_api.attention_block(qa, qa[:, :, :1], qa[:, :, :1], pos, pos, kernels="gpu")

    lhs = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    rhs = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 4))
    sizes = jnp.array([10, 6], jnp.int32)
    assert _rel(moe_api.grouped_matmul(lhs, rhs, sizes, kernels="auto"), moe_ref.grouped_matmul(lhs, rhs, sizes)) == 0.0
    with pytest.raises(NotImplementedError, match="bf16") as e:
        moe_api.grouped_matmul(lhs, rhs, sizes, kernels="gpu")
    assert "our Mosaic GPU kernel: mosaic grouped matmul: lhs float32" in str(e.value)  # every reason, in order
    assert "; tokamax ragged_dot: tokamax ragged_dot: lhs float32" in str(e.value)


def test_first_that_runs_takes_the_first_implementation_that_runs(caplog):
    """The selection every kernels/*/api.py uses: in order, the first that does not raise NotImplementedError;
    under kernels="gpu" none running names every reason; under "auto" each reason is logged once and the
    reference runs; any other error propagates."""
    from pcp_jax.kernels.backend import first_that_runs

    def refuse(reason):
        def run():
            raise NotImplementedError(reason)
        return run

    refusing = [("a", refuse("too wide")), ("b", refuse("fp32"))]
    with caplog.at_level("WARNING", logger="pcp_jax.kernels.backend"):
        table = [("a", refuse("too wide")), ("b", lambda: "b ran"), ("c", lambda: "c ran")]
        assert first_that_runs("op", "gpu", table, lambda: "reference") == "b ran"
        with pytest.raises(NotImplementedError, match=r"^op with kernels='gpu': .*: a: too wide; b: fp32$"):
            first_that_runs("op", "gpu", refusing, lambda: "reference")
        for _ in range(3):
            assert first_that_runs("op", "auto", refusing, lambda: "reference") == "reference"
    assert [r.getMessage() for r in caplog.records] == [  # each once
        "op: a unavailable (too wide); trying b", "op: b unavailable (fp32); running the jnp reference"]
    assert first_that_runs("op", "auto", [], lambda: "reference") == "reference"

    def broken():
        raise RuntimeError("compile failed")
    with pytest.raises(RuntimeError, match="compile failed"):
        first_that_runs("op", "auto", [("a", broken)], lambda: "reference")


def test_gpu_backend_preload_runs_before_tracing_and_keeps_jit_caches(monkeypatch):
    """Importing a Pallas GPU backend registers JAX config options that are part of every jit cache key;
    a lazy import inside the first trace made the model's next call compile again (H100, 70 s). Model
    construction therefore imports them up front when GPU kernels are selected."""
    import sys

    from pcp_jax.kernels import backend

    seen = []
    monkeypatch.setattr(backend, "use_gpu_kernels", lambda kernels: kernels != "jnp")
    monkeypatch.setattr("importlib.import_module", lambda name: seen.append(name) or sys.modules.get(name))
    assert backend.preload_gpu_backends("jnp") == [] and seen == []
    backend.preload_gpu_backends("auto")
    assert seen == list(backend.GPU_BACKEND_MODULES)


def test_model_prefill_traces_once_across_calls():
    from pcp_jax.config import PRESETS
    from pcp_jax.engine import Model
    from pcp_jax.weights import random_params

    cfg = PRESETS["demo"]
    model = Model(cfg, random_params(cfg, seed=3, dtype=jnp.float32), dtype="float32")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 200))
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: traces.append(event) if event == "/jax/core/compile/jaxpr_trace_duration" else None)
    first = np.asarray(model.prefill(ids).logits)
    assert traces, "the first prefill traced nothing: the listener does not see traces"
    traced = len(traces)
    second = np.asarray(model.prefill(ids).logits)
    np.testing.assert_array_equal(first, second)
    assert len(traces) == traced, "the second prefill of the same length traced again"

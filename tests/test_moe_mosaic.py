"""Our Mosaic GPU grouped matmul (kernels/moe/mosaic_gpu.py) on CPU through the Pallas GPU interpreter.

The interpreter simulates the warpgroups, shared memory, TMA copies and barriers; it starts every buffer as
NaN, so an output row the kernel fails to write shows. With detect_races=True it also fails on unsynchronised
shared-memory accesses between warpgroups. Inputs: bf16, fresh random values, ragged groups with empty
experts, rows past the routed ones (which must come out 0). Reference: the fp32 jnp grouped matmul on the
same bf16 values. Tolerance: relative L2 error <= 1e-2 (one bf16 rounding of the output, ~2e-3 measured).
Speed is measured on the GPU (benchmarks/moe.py, benchmarks/moe_layer.py), never here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pcp_jax.kernels.moe import mosaic_gpu as mg
from pcp_jax.kernels.moe import reference as ref
from test_kernels_gpu_interpret import _rel

TOL = 1e-2


@pytest.mark.parametrize("seed", range(6))
def test_row_tiles_cover_each_routed_row_once(seed):
    """Every row, routed or padding, is stored by exactly one tile, of its own group; windows are aligned,
    lie inside the rows and hold the stored rows; the static tile count bounds the used tiles."""
    rng = np.random.default_rng(seed)
    E = int(rng.integers(1, 40))
    block_m = int(rng.choice([64, 128]))
    sizes = rng.integers(0, 200, E) * (rng.random(E) < 0.7)
    routed = int(sizes.sum())
    rows = max(-(-(routed + int(rng.integers(0, 50))) // mg.ALIGN) * mg.ALIGN, block_m)
    group, start, lo, size, real = map(np.asarray, mg.row_tiles(jnp.asarray(sizes, jnp.int32), rows, block_m))
    assert np.all(group[: real[0]] < E) and np.all((group[real[0]:] == E) | (size[real[0]:] == 0))
    owner = np.full(rows, -1)
    expected = np.concatenate([np.repeat(np.arange(E), sizes), np.full(rows - routed, E)])
    for g, s, o, n in zip(group, start, lo, size):
        if n == 0:
            continue
        assert s % mg.ALIGN == 0 and 0 <= s and s + block_m <= rows and 0 <= o and o + n <= block_m
        stored = np.arange(s + o, s + o + n)
        assert np.all(owner[stored] == -1), "a row stored twice"
        owner[stored] = g
    assert np.array_equal(owner, expected)


CASES = [  # rows, K, N, sizes (sum < rows: padding rows), config
    (100, 128, 256, [30, 0, 17, 41, 2], mg.Config(64, 128, 64, 2)),
    (300, 192, 256, [130, 0, 7, 90, 1, 60], mg.Config(128, 64, 64, 3)),
    (300, 256, 512, [130, 0, 7, 90, 1, 60], mg.Config(64, 64, 64, 2, chain=True)),  # 20 items on 2 CTAs
    (64, 128, 256, [10, 20], mg.Config(64, 128, 64, 2, chain=True)),  # one CTA with a single real item
    (200, 128, 256, [70, 0, 100], mg.Config(64, 128, 64, 2, swizzle_out=True)),  # swizzled output rows
    (400, 128, 256, [190, 0, 150, 3], mg.Config(192, 64, 64, 2)),  # 192-row tiles: three wgmma row blocks
    (400, 256, 256, [190, 0, 150, 3], mg.Config(192, 64, 64, 2, chain=True)),  # ... chained across items
]


@pytest.mark.parametrize("rows,K,N,sizes,cfg", CASES)
def test_grouped_matmul_interpret(rows, K, N, sizes, cfg):
    rng = np.random.default_rng(rows)
    E = len(sizes)
    gs = jnp.asarray(sizes, jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((rows, K)), jnp.bfloat16)
    lhs = lhs.at[sum(sizes):].set(jnp.nan)  # unrouted rows: never read into a stored row
    rhs = jnp.asarray(rng.standard_normal((E, K, N)) * K**-0.5, jnp.bfloat16)
    out = mg.grouped_matmul(lhs, rhs, gs, config=cfg, interpret=plgpu.InterpretGPUParams(detect_races=True))
    want = ref.grouped_matmul(lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs)
    assert out.shape == (rows, N) and out.dtype == jnp.bfloat16
    assert bool(jnp.all(out[sum(sizes):] == 0)), "rows past the routed ones must be 0"
    assert _rel(out[: sum(sizes)], want[: sum(sizes)]) <= TOL


@pytest.mark.parametrize("cfg", [mg.Config(64, 64, 64, 2), mg.Config(192, 64, 64, 2)])
def test_grouped_swiglu_interpret(cfg):
    rng = np.random.default_rng(7)
    rows, K, I, sizes = 200, 128, 128, [0, 33, 150, 0]
    gs = jnp.asarray(sizes, jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((rows, K)), jnp.bfloat16)
    wg = jnp.asarray(rng.standard_normal((4, K, I)) * K**-0.5, jnp.bfloat16)
    wu = jnp.asarray(rng.standard_normal((4, K, I)) * K**-0.5, jnp.bfloat16)
    out = mg.grouped_swiglu(lhs, wg, wu, gs, config=cfg, interpret=plgpu.InterpretGPUParams(detect_races=True))
    want = mg.swiglu_reference(lhs.astype(jnp.float32), wg, wu, gs)
    manual = jnp.concatenate([jax.nn.silu(lhs[:33].astype(jnp.float32) @ wg[1].astype(jnp.float32))
                              * (lhs[:33].astype(jnp.float32) @ wu[1].astype(jnp.float32)),
                              jax.nn.silu(lhs[33:183].astype(jnp.float32) @ wg[2].astype(jnp.float32))
                              * (lhs[33:183].astype(jnp.float32) @ wu[2].astype(jnp.float32))])
    assert _rel(want[:183], manual) <= 1e-6  # the reference itself, against per-expert dense products
    assert bool(jnp.all(out[183:] == 0))
    assert _rel(out[:183], want[:183]) <= TOL


def test_unsupported_shapes_are_refused():
    x = jnp.zeros((64, 128), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="bf16"):
        mg.grouped_matmul(x.astype(jnp.float32), jnp.zeros((2, 128, 256)), jnp.array([64, 0]))
    with pytest.raises(NotImplementedError, match="block_k"):
        mg.grouped_matmul(x[:, :100], jnp.zeros((2, 100, 256), jnp.bfloat16), jnp.array([64, 0]))
    with pytest.raises(NotImplementedError, match="N=192"):
        mg.grouped_matmul(x, jnp.zeros((2, 128, 192), jnp.bfloat16), jnp.array([64, 0]))
    with pytest.raises(NotImplementedError, match="shared memory"):
        mg.grouped_matmul(x, jnp.zeros((2, 128, 256), jnp.bfloat16), jnp.array([64, 0]),
                          config=mg.Config(128, 128, 64, 4))


@pytest.mark.parametrize("swiglu,cfg", [(False, mg.MATMUL_CONFIG), (True, mg.SWIGLU_CONFIG),
                                        (False, mg.WIDE_MATMUL_CONFIG), (False, mg.WIDE_MATMUL_CHAINED),
                                        (True, mg.WIDE_SWIGLU_CONFIG)])
def test_kernel_lowers_for_hopper(monkeypatch, swiglu, cfg):
    """The kernel goes through the Mosaic GPU lowering for a CUDA target (no GPU needed): errors the
    interpreter cannot see (layouts, wgmma operands) show here, before a GPU run."""
    monkeypatch.setattr(jax.extend.backend, "get_default_device", lambda: type("H100", (), {"core_count": 132}))
    x = jax.ShapeDtypeStruct((4096, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((8, 512, 1024), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((8,), jnp.int32)
    if swiglu:
        fn = lambda a, b, c: mg.grouped_swiglu(a, b, b, c, config=cfg)
    else:
        fn = lambda a, b, c: mg.grouped_matmul(a, b, c, config=cfg)
    text = jax.jit(fn).trace(x, w, g).lower(lowering_platforms=("cuda",)).as_text()
    assert "wgmma" in text


@pytest.mark.parametrize("rows,experts,wide", [
    (8192 * 10, 512, True),  # the 397B at 8k tokens: 160 rows per expert
    (8192 * 8, 256, False),  # 122B / 35B at 8k: 256
    (32768 * 10, 512, False),  # 397B at 32k: 640
    (4096 * 10, 512, False),  # 397B at 4k: 80 (fits one 128-row tile)
    (120 * 64, 64, True),  # mean 120 + 11 expected > 128
])
def test_default_config_widens_tiles_only_where_one_192_row_tile_replaces_two(rows, experts, wide):
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    for swiglu, base, wider in ((False, mg.MATMUL_CONFIG, mg.WIDE_MATMUL_CONFIG),
                                (True, mg.SWIGLU_CONFIG, mg.WIDE_SWIGLU_CONFIG)):
        assert mg.default_config(rows, experts, swiglu) == (wider if wide else base)
        for K in (1024, 640):  # 16 contraction steps (a multiple of the stages: chained when wide), 10
            cfg = mg.default_config(rows, experts, swiglu, contraction=K)
            assert cfg.chain == (wide and not swiglu and K == 1024)
            mg.check_supported(spec(rows, K), [spec(experts, K, 1024)] * (2 if swiglu else 1), cfg)

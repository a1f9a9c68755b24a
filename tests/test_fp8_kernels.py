"""FP8 matmuls (kernels/fp8): the jnp references against the dequantized fp32 product, and the XLA w8a8
implementation against the reference.

Tolerances (relative L2 error against x @ dequantized weight in fp32, fresh random inputs):
- weight-only in bf16: <= 1e-2 (the bf16 rounding of the weights, the activations and the output; ~3e-3 seen);
- weight-only in fp32: <= 1e-6 (the same product, accumulated in another order);
- w8a8: <= 6e-2 (the e4m3 rounding of the activations, relative 2^-4 per element at most; ~2.5e-2 seen), and
  equal to the product of the quantized activations and the dequantized weight to fp32 rounding;
- the XLA per-block FP8 dots against the reference: <= 1e-5 (fp32 accumulation order).
The tokamax path needs a GPU (benchmarks/fp8.py checks it there); here only its refusals, which must come
before tokamax is imported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax.kernels.fp8 import api, reference, tokamax_gpu, xla_gpu

F32 = jnp.float32


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _weight(seed: int, shape, block=reference.BLOCK):
    """Random FP8 weights: N(0, 1/K) values quantized per block, with per-block magnitudes spread over 2^±3 (as
    trained weights' blocks differ), and their dequantized fp32 values."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k1, shape, F32) * shape[-1] ** -0.5
    grid = tuple(-(-d // b) for d, b in zip(shape[-2:], block))
    spread = 2.0 ** jax.random.uniform(k2, (*shape[:-2], *grid), F32, -3, 3)
    w = w * reference._expand(spread, block, shape)
    values, scale = reference.quantize(w, block)
    return values, scale, reference.dequantize(values, scale, block, F32)


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((3, 200, 130), (128, 128)),
                                         ((256, 192), (64, 128))])
def test_quantize_rounds_each_element_to_e4m3_of_its_block(shape, block):
    """Every element is w / scale rounded to the nearest e4m3 (relative 2^-4 for normal values, absolute 2^-10 of
    the block's scale for subnormal ones); each block's largest element is exactly 448 scale; partial blocks get
    a scale of their own."""
    w = jax.random.normal(jax.random.key(0), shape, F32)
    values, scale = reference.quantize(w, block)
    assert values.dtype == jnp.float8_e4m3fn and scale.shape == (*shape[:-2], -(-shape[-2] // block[0]),
                                                                   -(-shape[-1] // block[1]))
    err = jnp.abs(reference.dequantize(values, scale, block, F32) - w)
    s = reference._expand(scale, block, shape)
    assert bool(jnp.all(err <= 2.0**-4 * jnp.abs(w) + 2.0**-10 * s))
    assert float(jnp.max(jnp.abs(values.astype(F32)))) == 448.0


def test_weight_only_matches_the_dequantized_product():
    values, scale, w = _weight(1, (384, 256))
    x = jax.random.normal(jax.random.key(2), (3, 17, 256), F32)
    want = jnp.einsum("btk,nk->btn", x, w, precision="highest")
    assert _rel(reference.matmul(x, values, scale, reference.BLOCK), want) <= 1e-6
    got = reference.matmul(x.astype(jnp.bfloat16), values, scale, reference.BLOCK)
    assert got.dtype == jnp.bfloat16 and _rel(got, want) <= 1e-2


def test_w8a8_is_the_product_of_e4m3_activations():
    values, scale, w = _weight(3, (256, 384))
    x = jax.random.normal(jax.random.key(4), (40, 384), F32) * 3.0
    got = reference.matmul(x, values, scale, reference.BLOCK, "dynamic")
    want = jnp.dot(x, w.T, precision="highest")
    assert 1e-3 < _rel(got, want) <= 6e-2  # the activations were rounded, but only to e4m3
    xq, sx = reference.quantize_activations(x, 128)
    assert xq.dtype == jnp.float8_e4m3fn and sx.shape == (40, 3)
    x_seen = xq.astype(F32) * jnp.repeat(sx, 128, axis=1)
    assert bool(jnp.all(jnp.abs(x_seen - x) <= 2.0**-4 * jnp.abs(x) + 2.0**-10 * jnp.repeat(sx, 128, axis=1)))
    assert _rel(got, jnp.dot(x_seen, w.T, precision="highest")) <= 1e-6


@pytest.mark.parametrize("block", [(128, 128), (64, 128), (128, 64)])
def test_xla_w8a8_equals_the_reference(block):
    """One FP8 dot per contraction block, scaled and accumulated: the reference's value to fp32 rounding, for the
    blocks a tp rank may hold (64 where its share cuts a 128-block)."""
    values, scale, _ = _weight(5, (256, 512), block)
    x = jax.random.normal(jax.random.key(6), (2, 9, 512), jnp.bfloat16)
    want = reference.matmul(x.astype(F32), values, scale, block, "dynamic")
    got = xla_gpu.matmul_w8a8(x.astype(F32), values, scale, block)
    assert _rel(got, want) <= 1e-5
    assert xla_gpu.matmul_w8a8(x, values, scale, block).dtype == jnp.bfloat16


@pytest.mark.parametrize("activations", ["weights", "dynamic"])
def test_grouped_matmul_routes_each_row_to_its_expert(activations):
    """Row r times its expert's weight (the dense op's numerics), rows past the routed ones 0, empty experts
    skipped; the XLA w8a8 grouped path equals the reference."""
    sizes = np.array([5, 0, 30, 1, 0, 12])
    values, scale, _ = _weight(7, (len(sizes), 256, 384))
    lhs = jax.random.normal(jax.random.key(8), (sizes.sum() + 7, 384), F32)
    got = reference.grouped_matmul(lhs, values, scale, reference.BLOCK, jnp.asarray(sizes), activations)
    expert = np.repeat(np.arange(len(sizes)), sizes)
    for r in range(sizes.sum()):
        row = reference.matmul(lhs[r:r + 1], values[expert[r]], scale[expert[r]], reference.BLOCK, activations)
        assert _rel(got[r:r + 1], row) <= 1e-6
    assert float(jnp.abs(got[sizes.sum():]).max()) == 0.0
    if activations == "dynamic":
        xla = xla_gpu.grouped_matmul_w8a8(lhs, values, scale, reference.BLOCK, jnp.asarray(sizes))
        assert _rel(xla, got) <= 1e-5 and float(jnp.abs(xla[sizes.sum():]).max()) == 0.0


def test_api_runs_the_reference_off_gpu():
    values, scale, _ = _weight(9, (128, 256))
    x = jax.random.normal(jax.random.key(10), (4, 256), jnp.bfloat16)
    for kernels in ("auto", "jnp"):
        for activations in ("weights", "dynamic"):
            got = api.matmul(x, values, scale, reference.BLOCK, activations=activations, kernels=kernels)
            assert jnp.array_equal(got, reference.matmul(x, values, scale, reference.BLOCK, activations))
    with pytest.raises(ValueError, match="kernels='gpu' needs a GPU backend"):
        api.matmul(x, values, scale, reference.BLOCK, kernels="gpu")
    with pytest.raises(ValueError, match="activations='int8'"):
        reference.matmul(x, values, scale, reference.BLOCK, "int8")
    with pytest.raises(ValueError, match="does not cover weights"):
        reference.matmul(x, values, scale[:, :1], reference.BLOCK)


def test_tokamax_path_refuses_before_importing_tokamax():
    """Inputs it does not take raise NotImplementedError (api.py then tries the next implementation) without
    importing tokamax, which CPU installs lack."""
    values, scale, _ = _weight(11, (2, 128, 256))
    lhs = jnp.zeros((8, 256), F32)
    with pytest.raises(NotImplementedError, match="activations float32; it takes bf16/fp16"):
        tokamax_gpu.grouped_matmul(lhs, values, scale, reference.BLOCK, jnp.array([4, 4]))
    with pytest.raises(NotImplementedError, match="needs whole blocks"):
        tokamax_gpu.grouped_matmul(lhs.astype(jnp.bfloat16), values, scale, (128, 96), jnp.array([4, 4]))

"""The one declaration per weight (pcp_jax.weights): random weights follow each tensor's declared initializer
with the same seed -> same arrays scheme as before the declaration existed, `RandomSource` places those values
where nothing is stacked or repeated, and the FP8 block scales are declared for the matrices a released FP8
checkpoint quantizes, in its 128x128 layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax.config import PRESETS
from pcp_jax.parallel.tensor import place_params
from pcp_jax.sharding import make_mesh
from pcp_jax.weights import RandomSource, declare, param_shapes, random_params
from tiny import tiny_config


def test_random_params_follow_the_declared_initializers_and_the_seed():
    cfg = tiny_config(moe=True)
    params = random_params(cfg, seed=7, dtype=jnp.float32)
    names = sorted(param_shapes(cfg))
    assert list(params) == names
    key = lambda name: jax.random.fold_in(jax.random.key(7), names.index(name))  # the key of every release
    normal = lambda name, std: np.asarray(jax.random.normal(key(name), param_shapes(cfg)[name], jnp.float32) * std)
    D = cfg.hidden_size
    np.testing.assert_array_equal(params["embed"], normal("embed", 1.0))
    np.testing.assert_array_equal(params["layers.1.attn.q_proj"], normal("layers.1.attn.q_proj", D**-0.5))
    np.testing.assert_array_equal(params["layers.0.moe.down_proj"],
                                  normal("layers.0.moe.down_proj", cfg.moe_intermediate_size**-0.5))
    np.testing.assert_array_equal(params["layers.0.gdn.conv_weight"], normal("layers.0.gdn.conv_weight", 0.5))
    a_log = np.asarray(params["layers.2.gdn.A_log"])
    np.testing.assert_array_equal(a_log, np.asarray(jnp.log(jax.random.uniform(
        key("layers.2.gdn.A_log"), a_log.shape, jnp.float32, 1.0, 16.0))))
    assert np.all(params["layers.3.input_norm"] == 0) and np.all(params["layers.1.attn.k_norm"] == 0)
    assert np.all(params["layers.0.gdn.dt_bias"] == 1) and np.all(params["layers.0.gdn.norm"] == 1)
    bf16 = random_params(cfg, seed=7)
    assert bf16["embed"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(bf16["embed"], params["embed"].astype(jnp.bfloat16))


def test_random_source_places_the_values_of_random_params():
    """Unstacked and unsplit, each device parameter is its contract tensor: the same values as random_params."""
    cfg = tiny_config()
    placed = place_params(cfg, make_mesh(1, 1), RandomSource(cfg, seed=4), np.float32, period=1, groups=0)
    expected = random_params(cfg, seed=4, dtype=jnp.float32)
    assert sorted(placed) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(placed[name]), np.asarray(value), err_msg=name)


QUANTIZED = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "gdn.in_proj_qkv", "gdn.in_proj_z",
             "gdn.out_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "moe.gate_proj", "moe.up_proj",
             "moe.down_proj", "moe.shared.gate_proj", "moe.shared.up_proj", "moe.shared.down_proj")


@pytest.mark.parametrize("name", ["qwen3.5-9b", "qwen3.5-397b-a17b"])
def test_fp8_block_scales_are_declared_for_the_linear_matrices(name):
    """An FP8 release keeps embeddings, the LM head, norms, the router, the shared-expert gate and the small
    GDN tensors (conv, A_log, dt_bias, in_proj_a/b) in 16 bits; HF stores weight_scale_inv [out/128, in/128]
    per Linear weight, the transpose of the scale of our input-major matrix."""
    cfg = PRESETS[name]
    for full, w in declare(cfg).items():
        leaf = full.split(".", 2)[2] if full.startswith("layers.") else full
        assert (w.scale is not None) == (leaf in QUANTIZED), full
        if w.scale is not None:
            *experts, n_in, n_out = w.shape
            assert w.scale.shape(w.shape) == (*experts, -(-n_in // 128), -(-n_out // 128))
    if cfg.is_moe:  # experts [E, D, Fe] = [512, 4096, 1024]: one scale per 128x128 block of each expert
        gate = declare(cfg)["layers.0.moe.gate_proj"]
        assert gate.shape == (512, 4096, 1024) and gate.scale.shape(gate.shape) == (512, 32, 8)

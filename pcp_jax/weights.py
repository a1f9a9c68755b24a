"""One declaration per weight of the checkpoint contract, and the random weights made from it.

`declare(cfg)` names every flat parameter of a config (docs/convert.md) in streaming order (embed, layers
0..L-1, final_norm, lm_head) with one `Weight` each: its shape (input-major, y = x @ W), the dtype it takes on
the device, how it splits over the mesh axis `tp`, its random initializer and, for the matrices an FP8
checkpoint quantizes, its block scale. Everything else derives from it:
- `param_shapes(cfg)`: the contract's names and shapes, which the converter and every loader check;
  `contract_shapes(cfg, fp8)` adds the block scale `<name>.scale` of each tensor an FP8 checkpoint stores as e4m3
  (input-major like the weight: [..., ceil(in/128), ceil(out/128)], the transpose of HF's `weight_scale_inv`);
- the tp placement of each tensor (pcp_jax.parallel.tensor.placements) and its shape on one rank
  (`device_shapes` there), hence the weight bytes of pcp_jax.memory;
- `random_params` / `RandomSource`: random weights with sane scales, for the demo, tests and benchmarks
  (`RandomSource(cfg, fp8=True)`: the declared matrices quantized to FP8 on the devices).

Splits over tp (Megatron style; docs/communication.md): heads, intermediate columns, experts and vocabulary
rows are split; norms, the router and the shared-expert gate are replicated. Three layouts say how the
positions along the split axis are arranged before they are cut into tp equal blocks (rank r: block r):
  "plain"    as stored;
  "kv_heads" KV heads of head_dim columns, repeated up to tp where fewer (rank r reads head r // (tp/Hkv));
  "gdn_qkv"  the [q | k | v] conv channels regrouped rank-major [q_0 | k_0 | v_0 | q_1 | ...], GDN key heads
             repeated up to tp where fewer, so that rank r's block is its own [q | k | v].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig

LAYOUTS = ("plain", "kv_heads", "gdn_qkv")
INITS = ("zeros", "ones", "normal", "log_uniform")


@dataclasses.dataclass(frozen=True)
class TpSplit:
    """`axis` of the contract tensor is split over tp in equal blocks after arranging it by `layout`."""
    axis: int
    layout: str = "plain"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; expected one of {LAYOUTS}")


@dataclasses.dataclass(frozen=True)
class BlockScale:
    """An FP8 checkpoint may store this matrix as e4m3 with one scale per `block` of its last two axes (input,
    output), `weight_scale_inv` in the released layout, and the model may then keep it in FP8 on the device
    (pcp_jax.fp8). The scale splits over tp with the weight: a rank holds the scales of the blocks its share
    touches (pcp_jax.parallel.tensor.fp8_placements). Tensors without a BlockScale that a checkpoint stores
    in FP8 anyway are dequantized when loaded."""
    block: tuple[int, int] = (128, 128)

    def shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale's shape: leading axes (experts) kept, the last two counted in blocks (rounded up)."""
        *lead, rows, cols = weight_shape
        return (*lead, -(-rows // self.block[0]), -(-cols // self.block[1]))


@dataclasses.dataclass(frozen=True)
class Init:
    """Random initial values: "zeros", "ones", "normal" (N(0, std²)) or "log_uniform" (log of U[low, high))."""
    kind: str
    std: float = 0.0
    low: float = 0.0
    high: float = 0.0

    def __post_init__(self):
        if self.kind not in INITS:
            raise ValueError(f"initializer {self.kind!r}; expected one of {INITS}")


ZEROS, ONES = Init("zeros"), Init("ones")  # zero-centred norms: weight 0 is the identity scale


@dataclasses.dataclass(frozen=True)
class Weight:
    """One contract tensor: `shape`; `dtype` on the device ("model": the model dtype chosen at load); `tp`
    (None: every tp rank holds it whole); `init`; `scale` (None: never quantized)."""
    shape: tuple[int, ...]
    tp: TpSplit | None
    init: Init
    dtype: str = "model"
    scale: BlockScale | None = None


def _matrix(shape: tuple[int, ...], split: TpSplit | None, quantized: bool = True) -> Weight:
    """A matrix y = x @ W ([..., in, out]): N(0, 1/in) values."""
    return Weight(shape, split, Init("normal", std=shape[-2] ** -0.5), scale=BlockScale() if quantized else None)


def _norm(width: int) -> Weight:
    return Weight((width,), None, ZEROS)


def _attention(cfg: ModelConfig) -> dict[str, Weight]:
    D, hd, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    kv = TpSplit(1, "kv_heads")
    return {"attn.q_proj": _matrix((D, hq * 2 * hd), TpSplit(1)), "attn.k_proj": _matrix((D, hkv * hd), kv),
            "attn.v_proj": _matrix((D, hkv * hd), kv), "attn.o_proj": _matrix((hq * hd, D), TpSplit(0)),
            "attn.q_norm": _norm(hd), "attn.k_norm": _norm(hd)}


def _gdn(cfg: ModelConfig) -> dict[str, Weight]:
    D, hv, dv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_head_dim
    qkv, heads = TpSplit(1, "gdn_qkv"), TpSplit(0)
    return {"gdn.in_proj_qkv": _matrix((D, cfg.conv_dim), qkv), "gdn.in_proj_z": _matrix((D, hv * dv), TpSplit(1)),
            "gdn.in_proj_b": _matrix((D, hv), TpSplit(1), quantized=False),
            "gdn.in_proj_a": _matrix((D, hv), TpSplit(1), quantized=False),
            "gdn.conv_weight": Weight((cfg.conv_kernel, cfg.conv_dim), qkv, Init("normal", std=0.5)),
            "gdn.A_log": Weight((hv,), heads, Init("log_uniform", low=1.0, high=16.0)),
            "gdn.dt_bias": Weight((hv,), heads, ONES), "gdn.norm": Weight((dv,), None, ONES),
            "gdn.out_proj": _matrix((hv * dv, D), TpSplit(0))}


def _channel_mixer(cfg: ModelConfig) -> dict[str, Weight]:
    D = cfg.hidden_size
    if not cfg.is_moe:
        F = cfg.intermediate_size
        return {"mlp.gate_proj": _matrix((D, F), TpSplit(1)), "mlp.up_proj": _matrix((D, F), TpSplit(1)),
                "mlp.down_proj": _matrix((F, D), TpSplit(0))}
    E, Fe, Fs = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    experts = TpSplit(0)  # expert parallel: E/tp whole experts per rank
    out = {"moe.router": _matrix((D, E), None, quantized=False), "moe.gate_proj": _matrix((E, D, Fe), experts),
           "moe.up_proj": _matrix((E, D, Fe), experts), "moe.down_proj": _matrix((E, Fe, D), experts)}
    if Fs > 0:
        out |= {"moe.shared.gate_proj": _matrix((D, Fs), TpSplit(1)),
                "moe.shared.up_proj": _matrix((D, Fs), TpSplit(1)), "moe.shared.down_proj": _matrix((Fs, D), TpSplit(0)),
                "moe.shared_gate": _matrix((D, 1), None, quantized=False)}
    return out


def declare(cfg: ModelConfig) -> dict[str, Weight]:
    """Every contract tensor of `cfg` with its declaration, in streaming order."""
    D, V = cfg.hidden_size, cfg.vocab_size
    out = {"embed": Weight((V, D), TpSplit(0), Init("normal", std=1.0))}  # vocabulary rows split over tp
    layers = {kind: {"input_norm": _norm(D), **mixer(cfg), "post_norm": _norm(D), **_channel_mixer(cfg)}
              for kind, mixer in ((FULL_ATTENTION, _attention), (LINEAR_ATTENTION, _gdn))}
    for i, kind in enumerate(cfg.layer_types):
        out |= {f"layers.{i}.{leaf}": w for leaf, w in layers[kind].items()}
    out["final_norm"] = _norm(D)
    if not cfg.tie_word_embeddings:
        out["lm_head"] = _matrix((D, V), TpSplit(1), quantized=False)
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every flat parameter of `cfg` (the checkpoint contract: docs/convert.md) with its shape, input-major
    (y = x @ W), in streaming order: embed, layers 0..L-1, final_norm, lm_head."""
    return {name: w.shape for name, w in declare(cfg).items()}


SCALE = ".scale"  # the contract name of a weight's FP8 block scale is the weight's name plus this


def scale_shape(weight: Weight) -> tuple[int, ...]:
    """The shape of `weight`'s FP8 block scale: its declared BlockScale's, else 128x128 blocks."""
    return (weight.scale or BlockScale()).shape(weight.shape)


def fp8_names(cfg: ModelConfig) -> list[str]:
    """The contract tensors an FP8 release stores as e4m3 (those declared with a BlockScale), in streaming order."""
    return [name for name, w in declare(cfg).items() if w.scale is not None]


def contract_shapes(cfg: ModelConfig, fp8=()) -> dict[str, tuple[int, ...]]:
    """`param_shapes(cfg)` plus the block scale `<name>.scale` (float32) of every name in `fp8` (tensors stored as
    e4m3), each right after its weight. ValueError for a name that is no matrix of the contract."""
    weights, fp8 = declare(cfg), set(fp8)
    bad = sorted(n for n in fp8 if n not in weights or len(weights[n].shape) < 2)
    if bad:
        raise ValueError(f"FP8 tensors {bad[:5]} are not matrices of this config's contract")
    out = {}
    for name, w in weights.items():
        out[name] = w.shape
        if name in fp8:
            out[name + SCALE] = scale_shape(w)
    return out


def device_itemsize(weight: Weight, model_itemsize: int) -> int:
    """Bytes per element of `weight` on the device, where the model dtype takes `model_itemsize` bytes."""
    return model_itemsize if weight.dtype == "model" else np.dtype(weight.dtype).itemsize


# Random weights ----------------------------------------------------------------------------------
def sample(init: Init, key, shape: tuple[int, ...], dtype):
    """Values of `init` of `shape` in `dtype`, drawn in fp32 from `key`."""
    if init.kind == "zeros":
        return jnp.zeros(shape, dtype)
    if init.kind == "ones":
        return jnp.ones(shape, dtype)
    if init.kind == "log_uniform":
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, init.low, init.high)).astype(dtype)
    return (jax.random.normal(key, shape, jnp.float32) * init.std).astype(dtype)  # "normal"


def _keys(cfg: ModelConfig, seed: int) -> dict[str, jax.Array]:
    """The random key of every contract tensor: the seed's key folded with the name's rank in sorted order."""
    key = jax.random.key(seed)
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(sorted(param_shapes(cfg)))}


def random_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
    """Random weights with sane scales (identity norms, A_log in log[1, 16), unit dt_bias, conv taps N(0, 0.25),
    matrices N(0, 1/fan_in), the embedding N(0, 1)): for the demo and benchmarks, never a substitute for real
    ones. Flat contract {name: array} in sorted name order."""
    weights, keys = declare(cfg), _keys(cfg, seed)
    return {name: sample(weights[name].init, keys[name], weights[name].shape, dtype) for name in sorted(weights)}


class RandomSource:
    """Random weights (the initializers of `random_params`) generated on the devices, each device parameter by
    one program straight into its sharding: no host copy, so benchmarks can build models larger than host
    memory. A TensorSource for `Model(cfg, RandomSource(cfg), ...)`. Repeated KV / GDN key heads (tp above
    their count) and stacked layers get independent values: the timing is that of the real model, the
    function is not that of `random_params`. `fp8=True`: the matrices declared with a BlockScale come as an FP8
    checkpoint holds them (e4m3 values and float32 block scales, `contract_shapes(cfg, fp8_names(cfg))`), made by
    quantizing the random values per block on the devices (`place_fp8`)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, fp8: bool = False):
        self.weights, self.seed = declare(cfg), seed
        self.order = {name: i for i, name in enumerate(sorted(self.weights))}
        self.shapes = contract_shapes(cfg, fp8_names(cfg) if fp8 else ())

    def names(self):
        return self.shapes.keys()

    def shape(self, name: str):
        return self.shapes[name]

    def read(self, name, idx):
        raise NotImplementedError("RandomSource makes device arrays only (place)")

    def _key(self, placement):
        return jax.random.fold_in(jax.random.key(self.seed), self.order[placement.sources[0]])

    def place(self, placement, sharding, dtype) -> jax.Array:
        """The device parameter `placement` (pcp_jax.parallel.tensor.Placement) on `sharding`, in `dtype`."""
        make = jax.jit(sample, static_argnums=(0, 2, 3), out_shardings=sharding)
        return make(self.weights[placement.sources[0]].init, self._key(placement), placement.shape, np.dtype(dtype))

    def place_fp8(self, values, scale, block, shardings) -> tuple[jax.Array, jax.Array]:
        """The FP8 device parameter of placements `values` and `scale` (pcp_jax.parallel.tensor.fp8_placements):
        random values of the weight's initializer quantized per `block` of the values' layout, on `shardings`
        (values, scale). A stacked parameter is made one layer at a time, so that only one layer's values exist
        in float32 at once."""
        from pcp_jax.kernels.fp8.reference import quantize

        init = self.weights[values.sources[0]].init
        one = lambda key, shape: quantize(sample(init, key, shape, jnp.float32), block)

        def make(key):
            if not values.stacked:
                return one(key, values.shape)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(values.shape[0]))
            return jax.lax.map(lambda k: one(k, values.shape[1:]), keys)

        out = jax.jit(make, out_shardings=shardings)(self._key(values))
        if out[1].shape != scale.shape:
            raise ValueError(f"{scale.name}: blocks {block} of {values.shape} give scales {out[1].shape}, "
                             f"expected {scale.shape}")
        return out

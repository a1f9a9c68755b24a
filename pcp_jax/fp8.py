"""FP8 weights on the device: what the loader places, the model's module for them, and when they are used.

An FP8 checkpoint (the released layout: e4m3 `weight` with float32 `weight_scale_inv` per 128x128 block;
pcp_jax.convert.quantization) stores the matrices that pcp_jax.weights declares with a `BlockScale` in FP8.
`Model(..., weights=...)` (WEIGHT_MODES) decides what the device holds:
- "dequantize": every FP8 tensor is dequantized when loaded (values · scale in fp32, rounded once to the model
  dtype): the model is the bf16/fp32 model of the dequantized checkpoint, exactly as transformers'
  `FineGrainedFP8Config(dequantize=True)` computes it;
- "fp8": the declared matrices stay e4m3 on the device with their scales (`Fp8Param`, output-major like the
  checkpoint: values [..., N, K], scale [..., N/bn, K/bk]) and run weight-only FP8 matmuls
  (pcp_jax.kernels.fp8.api, activations="weights"): half the weight bytes of bf16;
- "fp8-w8a8": the same weights, with activations quantized per token and 128 channels to e4m3 (the
  checkpoints' dynamic activation scheme; activations="dynamic");
- "auto": "fp8" for an FP8 checkpoint in bfloat16 on a Hopper GPU with our GPU kernels on (kernels "auto" or
  "gpu"), else "dequantize" (CPU, other GPUs, dtype="float32", kernels="jnp").
A stacked parameter (layers of one scanned position) stays FP8 only when every layer's tensor is FP8 in the
checkpoint (a `modules_to_not_convert` entry can leave one layer in bf16); else it is dequantized, exactly.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

WEIGHT_MODES = ("auto", "dequantize", "fp8", "fp8-w8a8")
ACTIVATIONS = {"fp8": "weights", "fp8-w8a8": "dynamic"}  # the FP8 modes' activations (kernels.fp8.api)


@dataclasses.dataclass(frozen=True)
class Fp8Param:
    """One FP8 device parameter: values [..., N, K] float8_e4m3fn and scale [..., ceil(N/bn), ceil(K/bk)] float32,
    global arrays on the mesh; `block` = (bn, bk) elements of values per scale (128 each, or what a tp rank's
    share of a split axis allows: pcp_jax.parallel.tensor.fp8_placements); `activations` and `kernels`: how the
    model multiplies by it (kernels.fp8.api)."""
    values: jax.Array
    scale: jax.Array
    block: tuple[int, int]
    activations: str = "weights"
    kernels: str = "auto"


class Fp8Matrix(nnx.Module):
    """The model's FP8 weight (an `Fp8Param` as module state); `linear` multiplies by it."""

    def __init__(self, param: Fp8Param):
        self.values, self.scale = nnx.Param(param.values), nnx.Param(param.scale)
        self.block, self.activations, self.kernels = tuple(param.block), param.activations, param.kernels

    @property
    def shape(self) -> tuple[int, ...]:
        """The device layout's shape, [..., N, K]."""
        return self.values.shape


def linear(x, w):
    """x [..., K] @ w: a plain weight [K, N] (nnx.Param) or an `Fp8Matrix` -> [..., N] in x's dtype."""
    if isinstance(w, Fp8Matrix):
        from pcp_jax.kernels.fp8 import api
        return api.matmul(x, w.values[...], w.scale[...], w.block, activations=w.activations, kernels=w.kernels)
    return x @ w[...]


def is_hopper(mesh) -> bool:
    """Whether the mesh's devices are NVIDIA Hopper GPUs (compute capability 9.x: H100, H200, H20, H800)."""
    device = mesh.devices.flat[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def resolve_weights(weights: str, has_fp8: bool, dtype: str, gpu_kernels: bool, hopper: bool) -> str:
    """The mode `weights` (WEIGHT_MODES) resolves to for a source with (`has_fp8`) or without FP8 tensors:
    "dequantize" (which is also what a source without FP8 tensors loads as), "fp8" or "fp8-w8a8". ValueError
    for an unknown mode, or an FP8 mode asked of a source that holds no FP8 weights."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}; expected one of {list(WEIGHT_MODES)}")
    if weights in ACTIVATIONS and not has_fp8:
        raise ValueError(f"weights={weights!r} needs FP8 weights: an FP8 checkpoint (quantization_config quant_method "
                         f"'fp8') or RandomSource(cfg, fp8=True); these weights hold none (use weights='auto')")
    if weights == "auto":
        return "fp8" if has_fp8 and dtype == "bfloat16" and gpu_kernels and hopper else "dequantize"
    return weights


def describe_weights(placed: dict) -> str:
    """How the device parameters `placed` ({name: array or Fp8Param}) store the weights, as text for program
    keys: "model" when every one is in the model dtype, else each FP8 parameter with its block and activations."""
    fp8 = sorted((name, p.block, p.activations) for name, p in placed.items() if isinstance(p, Fp8Param))
    return repr(fp8) if fp8 else "model"

"""Quantized checkpoints: what config.json declares, what the tensors carry, and which methods load.

    declared_quantization(hf_config) -> str | None        the `quantization_config` method config.json names
    checkpoint_quantization(where, hf_config, tensors) -> str | None

`checkpoint_quantization` is the one place that decides: it returns the checkpoint's method (None for plain
floating-point weights) or raises a one-line ConvertError naming the method or the tensor. A checkpoint is
refused when config.json declares a quantization that its tensors do not carry (an fp8 config over bf16
weights), when its tensors are quantized (FP8 or integer weights, scale / zero-point / packed tensors) without
config.json declaring it, and when the declared method is not in SUPPORTED. No method is supported yet: the
released FP8 layout (e4m3 weights with 128x128 `weight_scale_inv` blocks, DESIGN.md section 4) joins SUPPORTED
with its loader, and this function then returns "fp8" instead of raising.

Only the tensors of the text model are looked at (`hf_names.SKIPPED_PREFIXES` lists the others).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import ConvertError
from .hf_names import FLOAT_DTYPES, SKIPPED_PREFIXES, TensorHeader

# Methods whose checkpoints load (see the module docstring).
SUPPORTED: tuple[str, ...] = ()

# Tensors only quantized checkpoints hold: block scales (fp8, compressed-tensors, modelopt), GPTQ/AWQ packed
# weights with their zero points and group indices, bitsandbytes' 8-bit and 4-bit state, MLX's biases.
_QUANT_TENSOR = re.compile(
    r"\.(weight_scale_inv|weight_scale(_2)?|input_scale|weight_zero_point|weight_packed|weight_shape|"
    r"weight_global_scale|input_global_scale|qweight|qzeros|scales|biases|g_idx|SCB|weight_format|absmax|"
    r"quant_map|nested_absmax|nested_quant_map|[kv]_scale|quant_state\..+)$")


def declared_quantization(hf_config: dict) -> str | None:
    """The method of config.json's `quantization_config` (top level, or in a multimodal `text_config`), e.g.
    "fp8", "gptq", "awq", "compressed-tensors", "bitsandbytes (nf4)"; None when it declares none. Raises a
    ConvertError when `quantization_config` is not an object with a `quant_method` string."""
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else {}
    qc = hf_config.get("quantization_config", text.get("quantization_config"))
    if qc is None:
        return None
    if not isinstance(qc, dict) or not isinstance(qc.get("quant_method"), str):
        raise ConvertError(f"config.json: field 'quantization_config' is {_short(qc)}; expected an object with a "
                           f"'quant_method' string")
    method = qc["quant_method"]
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return f"bitsandbytes ({qc.get('bnb_4bit_quant_type', 'fp4')})"
        if qc.get("load_in_8bit"):
            return "bitsandbytes (int8)"
    return method


def checkpoint_quantization(where: str, hf_config: dict, tensors: Mapping[str, TensorHeader]) -> str | None:
    """The quantization method of the checkpoint at `where` (config.json parsed as `hf_config`, safetensors
    headers `tensors`): None for floating-point weights, else a method in SUPPORTED; anything else raises a
    one-line ConvertError naming the method or the tensor (see the module docstring)."""
    declared = declared_quantization(hf_config)
    text_model = {n: h for n, h in tensors.items() if not n.startswith(tuple(SKIPPED_PREFIXES))}
    reasons = [(n, why) for n, h in text_model.items() if (why := _quantized(n, h))]
    carried = min(reasons, key=lambda r: not r[1].startswith("has dtype"), default=None)  # a weight's dtype first
    if declared is None and carried is None:
        return None
    if declared is None:
        name, why = carried
        raise ConvertError(f"{where}: tensor {name} {why}, but config.json declares no quantization "
                           f"('quantization_config'); expected weights of dtype {'/'.join(FLOAT_DTYPES)}")
    if carried is None:
        example = next(iter(text_model.items()), None)
        seen = f" ({example[0]} is {example[1].dtype})" if example else ""
        raise ConvertError(f"{where}: config.json declares quantization_config quant_method {declared!r}, but no "
                           f"tensor is quantized{seen}; remove quantization_config or use the quantized weights")
    if declared not in SUPPORTED:
        name, why = carried
        raise ConvertError(f"{where}: quantized checkpoints are not supported: config.json declares quant_method "
                           f"{declared!r} (tensor {name} {why}); use an unquantized BF16/F16/F32 checkpoint")
    return declared


def _quantized(name: str, header: TensorHeader) -> str | None:
    """Why tensor `name` belongs to a quantized checkpoint (its dtype or its name), or None."""
    if header.dtype not in FLOAT_DTYPES and header.dtype not in ("BOOL", "I64", "U64"):
        return f"has dtype {header.dtype}"
    if _QUANT_TENSOR.search(name):
        return "is a quantization tensor (scales, zero points or packed weights)"
    return None


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."

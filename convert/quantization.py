"""Quantized checkpoints: what config.json declares, what the tensors carry, and which methods load.

    declared_quantization(hf_config) -> str | None        the `quantization_config` method config.json names
    checkpoint_quantization(where, hf_config, tensors) -> str | None

`checkpoint_quantization` is the one place that decides: it returns the checkpoint's method (None for plain
floating-point weights, "fp8" for the released FP8 layout) or raises a one-line ConvertError naming the method,
the setting or the tensor. A checkpoint is refused when config.json declares a quantization that its tensors do
not carry (an fp8 config over bf16 weights), when its tensors are quantized (FP8 or integer weights, scale /
zero-point / packed tensors) without config.json declaring it, and when the declared method is not in SUPPORTED.

FP8 is the layout of the released Qwen3.5 FP8 checkpoints, read by transformers' `FineGrainedFP8Config`:
`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128], "modules_to_not_convert": [...]}`; each converted Linear stores `weight` as
F8_E4M3 and `weight_scale_inv` (a float, F32 in the releases) of shape [ceil(out/128), ceil(in/128)]; fused
experts store `gate_up_proj` / `down_proj` as F8_E4M3 with `gate_up_proj_scale_inv` / `down_proj_scale_inv`.
Anything else in the config is refused, naming it: another fmt, static activations, other block sizes,
power-of-two (ue8m0) scales, FP4 experts. The tensors decide which matrices are FP8 (every F8_E4M3 weight
needs its scale and every scale its F8_E4M3 weight: hf_names.plan checks that), and they must agree with
`modules_to_not_convert` where it speaks: no tensor of a module it lists (matched as transformers matches it:
from the start of the module name up to a dot, as a regular expression, or as a suffix) may be F8_E4M3.

Only the tensors of the text model are looked at (`hf_names.SKIPPED_PREFIXES` lists the others).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import ConvertError
from .hf_names import FLOAT_DTYPES, FP8_DTYPE, SKIPPED_PREFIXES, TensorHeader, is_scale_name

# Methods whose checkpoints load (see the module docstring).
SUPPORTED: tuple[str, ...] = ("fp8",)

# The FP8 settings that load, and the value each must have (a setting absent from config.json takes
# transformers' default, which is this value).
FP8_SETTINGS = {"fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                "scale_fmt": "float", "expert_dtype": "fp8"}

# Tensors only quantized checkpoints hold: block scales (fp8, compressed-tensors, modelopt), GPTQ/AWQ packed
# weights with their zero points and group indices, bitsandbytes' 8-bit and 4-bit state, MLX's biases.
_QUANT_TENSOR = re.compile(
    r"\.(weight_scale_inv|weight_scale(_2)?|input_scale|weight_zero_point|weight_packed|weight_shape|"
    r"weight_global_scale|input_global_scale|qweight|qzeros|scales|biases|g_idx|SCB|weight_format|absmax|"
    r"quant_map|nested_absmax|nested_quant_map|[kv]_scale|activation_scale|quant_state\..+)$|_scale_inv$")


def _quantization_config(hf_config: dict):
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else {}
    return hf_config.get("quantization_config", text.get("quantization_config"))


def declared_quantization(hf_config: dict) -> str | None:
    """The method of config.json's `quantization_config` (top level, or in a multimodal `text_config`), e.g.
    "fp8", "gptq", "awq", "compressed-tensors", "bitsandbytes (nf4)"; None when it declares none. Raises a
    ConvertError when `quantization_config` is not an object with a `quant_method` string."""
    qc = _quantization_config(hf_config)
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
    one-line ConvertError naming the method, the setting or the tensor (see the module docstring)."""
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
        raise ConvertError(f"{where}: quantized checkpoints other than FP8 are not supported: config.json declares "
                           f"quant_method {declared!r} (tensor {name} {why}); use an unquantized BF16/F16/F32 or "
                           f"the FP8 checkpoint")
    _check_fp8(where, _quantization_config(hf_config), text_model)
    return declared


def _check_fp8(where: str, qc: dict, tensors: Mapping[str, TensorHeader]) -> None:
    """The FP8 settings are those that load, the quantized tensors are FP8 weights and their float scales only,
    and no tensor of a module `modules_to_not_convert` lists is FP8 (one-line ConvertError otherwise)."""
    for key, want in FP8_SETTINGS.items():
        got = qc.get(key, want)
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise ConvertError(f"{where}: config.json's FP8 quantization_config has {key}={_short(got)}; pcp_jax "
                               f"loads {key}={want!r} only (the released FP8 layout)")
    patterns = qc.get("modules_to_not_convert") or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConvertError(f"{where}: config.json's quantization_config has modules_to_not_convert="
                           f"{_short(patterns)}; expected a list of module names")
    for name, header in tensors.items():
        if is_scale_name(name):
            if header.dtype not in FLOAT_DTYPES:
                raise ConvertError(f"{where}: FP8 scale tensor {name} has dtype {header.dtype}; expected "
                                   f"{'/'.join(FLOAT_DTYPES)} (F32 in the released checkpoints)")
        elif header.dtype == FP8_DTYPE:
            module = name.rsplit(".", 1)[0]  # `<module>.weight`, or fused experts' `<module>.gate_up_proj`
            listed = next((p for p in patterns if _module_matches(module, p)), None)
            if listed is not None:
                raise ConvertError(f"{where}: tensor {name} is {FP8_DTYPE}, but config.json's modules_to_not_convert "
                                   f"lists {listed!r}, which keeps module {module} unquantized")
        elif (why := _quantized(name, header)) is not None:
            raise ConvertError(f"{where}: tensor {name} {why}; an FP8 checkpoint holds F8_E4M3 weights with their "
                               f"weight_scale_inv and floating-point tensors only")


def _module_matches(module: str, pattern: str) -> bool:
    """Whether `pattern` of modules_to_not_convert names `module`, as transformers matches it: a regular expression
    matched from the start up to a module boundary, or a suffix of the name."""
    try:
        if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module):
            return True
    except re.error:
        pass
    return module.endswith(pattern)


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

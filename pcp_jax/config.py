"""Model configuration: one frozen dataclass holds every shape of a Qwen3.5 text model.

`ModelConfig.from_hf(dict)` reads a Hugging Face `config.json` (model types `qwen3_5`, `qwen3_5_text`,
`qwen3_5_moe`, `qwen3_5_moe_text`; multimodal configs nest the text model under `text_config`).
`PRESETS` holds the shapes of every released Qwen3.5 size, 0.8B to 397B-A17B (for benchmarks with random
weights, and for sizing with `pcp_jax.memory.memory_estimate` before loading anything).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

from pcp_jax.inputs import is_int

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
_LAYER_TYPES = (FULL_ATTENTION, LINEAR_ATTENTION)
_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")

# RoPE variants the model implements (`pcp_jax.model.rope_frequencies`): plain RoPE (released Qwen3.5 configs say
# "default", with M-RoPE sections that equal 1-D RoPE on text) and YaRN (the context extension Qwen's model cards
# describe). Every other `rope_type` is refused.
ROPE_TYPES = ("default", "yarn")
# The YaRN fields and the values that mean "not used" (required of configs whose rope_type is "default").
_YARN_UNUSED = dict(rope_factor=1.0, rope_original_max_position_embeddings=0, rope_attention_factor=1.0,
                    rope_beta_fast=32.0, rope_beta_slow=1.0, rope_truncate=True)
# A GDN layer's causal conv reads the K-1 tokens before each zigzag chunk from the neighbouring chunk alone, and
# chunks hold whole 64-token GDN chunks (pcp_jax.buckets): a longer kernel would need tokens of two chunks.
MAX_CONV_KERNEL = 65
# Keys of an HF text config that set RoPE (a multimodal config must hold them in text_config).
_ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "partial_rotary_factor")


# Field groups of ModelConfig by the values they accept (checked in __post_init__, before any arithmetic).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "conv_kernel")
_NON_NEGATIVE_INTS = ("intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "max_position_embeddings",
                      "rope_original_max_position_embeddings")
_POSITIVE_FLOATS = ("rope_theta", "partial_rotary_factor", "rope_factor", "rope_attention_factor", "rope_beta_fast",
                    "rope_beta_slow")
_BOOLS = ("tie_word_embeddings", "norm_topk_prob", "rope_truncate")


def _eos_ids(eos) -> tuple:
    """The ids of an `eos_token_id` field (None, one id or a list of ids)."""
    return tuple(eos) if isinstance(eos, (tuple, list)) else (() if eos is None else (eos,))


def _check_field_types(cfg: "ModelConfig") -> None:
    for name in _POSITIVE_INTS:
        v = getattr(cfg, name)
        if not is_int(v) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    for name in _NON_NEGATIVE_INTS:
        v = getattr(cfg, name)
        if not is_int(v) or v < 0:
            raise ValueError(f"{name}={v!r} must be a non-negative integer")
    for name in _POSITIVE_FLOATS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf:
            raise ValueError(f"{name}={v!r} must be a positive finite number")
    eps = cfg.rms_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"rms_norm_eps={eps!r} must be a non-negative finite number")
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be true or false")
    if not isinstance(cfg.layer_types, (tuple, list)) or not all(isinstance(t, str) for t in cfg.layer_types):
        raise ValueError(f"layer_types={cfg.layer_types!r} must be a list of layer type names {list(_LAYER_TYPES)}")
    eos = cfg.eos_token_id
    if not all(is_int(t) and t >= 0 for t in _eos_ids(eos)):
        raise ValueError(f"eos_token_id={eos!r} must be null, a non-negative integer or a list of them")
    if not isinstance(cfg.rope_type, str):
        raise ValueError(f"rope_type={cfg.rope_type!r} must be one of {list(ROPE_TYPES)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every shape of the text model. Attention: `num_heads` query heads and `num_kv_heads` KV heads of
    `head_dim`; GDN: `linear_num_key_heads` q/k heads of `linear_key_head_dim`, `linear_num_value_heads`
    value heads of `linear_value_head_dim`. `num_experts == 0` means dense MLPs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    conv_kernel: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.25
    # RoPE variant (ROPE_TYPES); the rope_* fields below are YaRN's (transformers' names without the prefix):
    # inverse frequencies blended between interpolated (/ factor) and original by a ramp over the rotary dims set
    # by beta_fast/beta_slow at `original_max_position_embeddings`; cos/sin scaled by `attention_factor`.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 0
    rope_attention_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    eos_token_id: int | tuple[int, ...] | None = None
    max_position_embeddings: int = 0  # positions the model was trained for (0: not stated, no limit checked)

    def __post_init__(self):
        # Types and signs first: the divisibility checks below (and every derived shape) would otherwise
        # fail with a ZeroDivisionError or TypeError that names no field.
        _check_field_types(self)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}")
        bad = sorted({t for t in self.layer_types if t not in _LAYER_TYPES})
        if bad:
            raise ValueError(f"unknown layer_types {bad}; expected only {list(_LAYER_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2 or not self.rotary_dim:
            raise ValueError(
                f"partial_rotary_factor={self.partial_rotary_factor} with head_dim={self.head_dim} gives a rotary "
                f"dimension of {self.rotary_dim}; it must be a positive even number")
        self._check_rope_variant()
        if self.conv_kernel > MAX_CONV_KERNEL:
            raise ValueError(f"conv_kernel={self.conv_kernel} is not supported; expected at most {MAX_CONV_KERNEL} "
                             f"(the GDN conv reads its K-1 preceding tokens from one 64-token chunk)")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive for MoE")
        elif self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size={self.intermediate_size} must be positive for a dense model "
                             f"(num_experts=0)")

    def _check_rope_variant(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; expected one of {list(ROPE_TYPES)}")
        if self.rope_type == "default":
            used = [f"{n}={getattr(self, n)!r}" for n, unused in _YARN_UNUSED.items() if getattr(self, n) != unused]
            if used:
                raise ValueError(f"rope_type is 'default' but YaRN fields are set: {', '.join(used)}")
            return
        if self.rope_factor < 1:
            raise ValueError(f"rope_factor={self.rope_factor} must be at least 1 for rope_type 'yarn'")
        if not self.rope_original_max_position_embeddings:
            raise ValueError("rope_original_max_position_embeddings=0: rope_type 'yarn' needs the positions the model "
                             "was pretrained for")

    def _check_eos_in_vocabulary(self) -> "ModelConfig":
        """Self, if every eos id is a token of the vocabulary. Checked where a whole model's config is read
        (`from_hf`, `from_dict`), not in __post_init__: a tensor-parallel shard's config (parallel.tensor.
        local_config) counts only its share of the vocabulary, while eos ids stay global."""
        if any(t >= self.vocab_size for t in _eos_ids(self.eos_token_id)):
            raise ValueError(f"eos_token_id={self.eos_token_id!r} is outside the vocabulary: every id must be in "
                             f"[0, vocab_size={self.vocab_size})")
        return self

    # Derived shapes -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION)

    @property
    def gdn_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The inverse of `to_dict` (fields left out take their defaults). Raises ValueError naming unknown
        fields, missing required ones and values of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object of fields, got a {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; expected only {sorted(fields)}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in d]
        if missing:
            raise ValueError(f"config is missing required fields {missing}")
        d = dict(d)
        if isinstance(d["layer_types"], list):
            d["layer_types"] = tuple(d["layer_types"])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)._check_eos_in_vocabulary()

    # Hugging Face config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed HF `config.json`. Raises ValueError naming any unknown model type or
        missing/inconsistent field."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json must hold a JSON object of fields, got a {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; expected one of {list(_MODEL_TYPES)}")
        where = f"config.json ({model_type})"
        text = hf
        if model_type in ("qwen3_5", "qwen3_5_moe"):
            if "text_config" not in hf:
                raise ValueError(f"model_type {model_type!r} config has no 'text_config'")
            text = dict(_hf_object(where, "text_config", hf["text_config"]))
            text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
            stray = [k for k in _ROPE_KEYS if hf.get(k) is not None]
            if stray:  # transformers reads RoPE from text_config only: these would be ignored silently
                raise ValueError(f"{where}: RoPE fields {stray} at the top level are not read; RoPE is read from "
                                 f"text_config, so move them there")
        is_moe = model_type.startswith("qwen3_5_moe")

        def need(name):
            if name not in text or text[name] is None:
                raise ValueError(f"{where} is missing required field {name!r}")
            return _hf_int(where, name, text[name])

        def opt_int(name, default):
            return _hf_int(where, name, text.get(name) or default)

        num_layers = need("num_hidden_layers")
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = _hf_int(where, "full_attention_interval", text.get("full_attention_interval", 4))
            if interval <= 0:
                raise ValueError(f"{where}: full_attention_interval={interval} must be a positive integer")
            layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(num_layers)]
        elif not isinstance(layer_types, list):
            raise ValueError(f"{where}: field 'layer_types' is {layer_types!r}; expected a list of layer types")
        max_positions = opt_int("max_position_embeddings", 0)
        rope = _hf_rope(where, text, max_positions)
        if rope["rope_type"] == "yarn":  # YaRN serves factor x the pretrained positions
            extended = int(rope["rope_factor"] * rope["rope_original_max_position_embeddings"])
            max_positions = max(max_positions, extended)
        hidden = need("hidden_size")
        num_heads = need("num_attention_heads")
        if num_heads <= 0:  # checked here because head_dim may be derived from it
            raise ValueError(f"{where}: num_attention_heads={num_heads} must be a positive integer")
        kwargs = dict(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            layer_types=tuple(layer_types),
            num_heads=num_heads,
            num_kv_heads=need("num_key_value_heads"),
            head_dim=opt_int("head_dim", hidden // num_heads),
            intermediate_size=opt_int("intermediate_size", 0),
            linear_num_key_heads=need("linear_num_key_heads"),
            linear_num_value_heads=need("linear_num_value_heads"),
            linear_key_head_dim=need("linear_key_head_dim"),
            linear_value_head_dim=need("linear_value_head_dim"),
            conv_kernel=opt_int("linear_conv_kernel_dim", 4),
            rms_norm_eps=_hf_number(where, "rms_norm_eps", text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=_hf_bool(where, "tie_word_embeddings", text.get("tie_word_embeddings", False)),
            eos_token_id=_eos(where, hf.get("eos_token_id", text.get("eos_token_id"))),
            max_position_embeddings=max_positions,
            **rope,
        )
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {text.get('hidden_act')!r} is not supported; expected 'silu'")
        if text.get("attention_bias", False):
            raise ValueError("attention_bias=True is not supported by Qwen3.5")
        if is_moe:
            kwargs.update(
                num_experts=need("num_experts"),
                num_experts_per_tok=need("num_experts_per_tok"),
                moe_intermediate_size=need("moe_intermediate_size"),
                shared_expert_intermediate_size=opt_int("shared_expert_intermediate_size", 0),
                norm_topk_prob=_hf_bool(where, "norm_topk_prob", text.get("norm_topk_prob", True)),
            )
            if not kwargs["norm_topk_prob"]:
                # transformers' qwen3_5_moe renormalises the top-k router weights whatever the flag says, other
                # implementations honour it: which one the checkpoint was trained with is not known.
                raise ValueError(f"{where}: norm_topk_prob=false is not supported; Qwen3.5 MoE renormalises the "
                                 f"top-k router weights (transformers ignores the flag)")
        elif kwargs["intermediate_size"] <= 0:
            raise ValueError(f"{where} is missing required field 'intermediate_size'")
        return cls(**kwargs)._check_eos_in_vocabulary()

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        except ValueError as e:  # invalid JSON or invalid UTF-8
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(data)


def _hf_int(where: str, name: str, value) -> int:
    """An integer field of an HF config (JSON may spell it 4 or 4.0), or a ValueError naming it."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"{where}: field {name!r} is {value!r}; expected an integer")
    return int(value)


def _hf_number(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field {name!r} is {value!r}; expected a number")
    return float(value)


def _hf_bool(where: str, name: str, value) -> bool:
    if not isinstance(value, bool):  # bool("false") is True: a quoted flag must not flip the model
        raise ValueError(f"{where}: field {name!r} is {value!r}; expected true or false")
    return value


def _hf_rope(where: str, text: dict, max_positions: int) -> dict[str, Any]:
    """The RoPE fields of ModelConfig from an HF text config, read as transformers' `qwen3_5` / `qwen3_5_moe`
    read them (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` and `standardize_rope_params`, then
    `_compute_yarn_parameters` when the model is built):
    - a non-empty legacy `rope_scaling` replaces `rope_parameters` whole;
    - in the dict that wins, its own `rope_theta` / `partial_rotary_factor` win over the text config's keys of the
      same name (defaults 10000 and 0.25), and `rope_type` over the legacy `type` (default "default");
    - YaRN: `factor` is required (null means max_position_embeddings / original); a text-level
      `original_max_position_embeddings` wins over the dict's, which defaults to max_position_embeddings;
      `attention_factor` defaults to 0.1 ln(factor) + 1, or to the ratio of that form with `mscale` and with
      `mscale_all_dim` when both are set; `beta_fast` / `beta_slow` default (also when 0) to 32 / 1, `truncate`
      to true.
    Keys transformers does not use for these types (`mrope_section`, `mrope_interleaved`: on text M-RoPE is 1-D
    RoPE) are ignored as it ignores them. Any other rope_type, or a dict per layer type, is refused."""
    scaling, params = text.get("rope_scaling"), text.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None:
            _hf_object(where, name, value)
    key, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {})
    nested = sorted(k for k, v in rope.items() if isinstance(v, dict))
    if nested:
        raise ValueError(f"{where}: {key} holds entries per layer type {nested}; expected one set of RoPE parameters")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: {key} has rope_type {rope_type!r}, which is not supported; expected one of "
                         f"{list(ROPE_TYPES)}")
    out = dict(rope_type=rope_type,
               rope_theta=_hf_number(where, "rope_theta", rope.get("rope_theta", text.get("rope_theta", 10_000.0))),
               partial_rotary_factor=_hf_number(where, "partial_rotary_factor", rope.get(
                   "partial_rotary_factor", text.get("partial_rotary_factor", 0.25))))
    if rope_type == "default":
        return out
    if "factor" not in rope:
        raise ValueError(f"{where}: {key} with rope_type 'yarn' needs 'factor'")
    if "original_max_position_embeddings" in text:
        original = _hf_int(where, "original_max_position_embeddings", text["original_max_position_embeddings"])
    elif "original_max_position_embeddings" in rope:
        original = _hf_int(where, f"{key}.original_max_position_embeddings", rope["original_max_position_embeddings"])
    else:
        original = max_positions
    if original <= 0:
        raise ValueError(f"{where}: rope_type 'yarn' needs original_max_position_embeddings (or "
                         f"max_position_embeddings), the positions the model was pretrained for; got {original}")
    factor = rope["factor"]
    factor = max_positions / original if factor is None and max_positions else _hf_number(where, "factor", factor)
    attention = rope.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = (None if rope.get(n) is None else _hf_number(where, n, rope[n])
                                  for n in ("mscale", "mscale_all_dim"))
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                     else _yarn_mscale(factor))
    out.update(rope_factor=factor, rope_original_max_position_embeddings=original,
               rope_attention_factor=_hf_number(where, "attention_factor", attention),
               rope_beta_fast=_hf_number(where, "beta_fast", rope.get("beta_fast") or 32),
               rope_beta_slow=_hf_number(where, "beta_slow", rope.get("beta_slow") or 1),
               rope_truncate=_hf_bool(where, "truncate", rope.get("truncate", True)))
    return out


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1 mscale ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _hf_object(where: str, name: str, value) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: field {name!r} is a {type(value).__name__}; expected a JSON object")
    return value


def _eos(where: str, v):
    if isinstance(v, list):
        return tuple(_hf_int(where, "eos_token_id", x) for x in v)
    return None if v is None else _hf_int(where, "eos_token_id", v)


def _every_fourth_full(num_layers: int) -> tuple[str, ...]:
    return tuple(LINEAR_ATTENTION if (i + 1) % 4 else FULL_ATTENTION for i in range(num_layers))


def _qwen35(num_layers: int, **shape) -> ModelConfig:
    """A released Qwen3.5 text model: what every size shares (vocabulary 248320, attention head_dim 256,
    GDN key/value heads of 128 with 16 key heads, conv kernel 4, full attention every 4th layer, RoPE theta
    1e7 on a quarter of each head, 262144 positions, EOS 248046 = <|im_end|>), plus the size's `shape`.
    EOS is the top-level `eos_token_id` of the released multimodal config.json (what `from_hf` reads), as
    copies of the 0.8B and 27B configs state it; the text_config's own is 248044 (<|endoftext|>)."""
    return ModelConfig(
        vocab_size=248320, num_layers=num_layers, layer_types=_every_fourth_full(num_layers), head_dim=256,
        linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, conv_kernel=4,
        rope_theta=10_000_000.0, partial_rotary_factor=0.25, max_position_embeddings=262144,
        eos_token_id=248046, **shape)


# Sources of each size's values (the table was checked against them; none disagrees with it). No
# config.json of Qwen/Qwen3.5-* itself is in reach of our search; these are copies and ports of them:
#  [T] transformers' Qwen3_5TextConfig defaults, which are the 9B (vendored in vllm-project/vllm
#      vllm/transformers_utils/configs/qwen3_5.py);
#  [J] p-doom/omegalax omegalax/models/qwen3_5/config.py `_QWEN3_5_SPECS`: per-size overrides keyed by the
#      Qwen/Qwen3.5-* repository ids (hidden, layers, heads, MLP or experts, GDN value heads, tied), the rest
#      from its 397B-shaped defaults (GDN 16 x 128 / 64 x 128, conv 4, head_dim 256, theta 1e7, 1/4 rotary);
#  [C] third-party copies of released config.json text_configs: 0.8B ("Qwen/Qwen3.5-0.8B@2fc06364
#      config.json" in a test, and others), 4B (a Qwen3_5ForCausalLM export), 27B (a full Qwen3_5Config in a
#      test; the 27B model card's hidden 5120 / 64 layers), 122B-A10B and 397B-A17B (several, agreeing);
#  [M] moyuan5989/CortexLab tests/test_qwen3_5.py, "real config dicts for 0.8B and 2B" (not a config.json).
PRESETS: dict[str, ModelConfig] = {
    # [J][C][M]: 1024 hidden, 24 layers, 8/2 heads, MLP 3584, GDN 16/16, tied.
    "qwen3.5-0.8b": _qwen35(24, hidden_size=1024, num_heads=8, num_kv_heads=2, intermediate_size=3584,
                            linear_num_value_heads=16, tie_word_embeddings=True),
    # [J][M] only: no copy of its config.json was found (its GDN 16/16 is the least certain value).
    # 2048 hidden, 24 layers, 8/2 heads, MLP 6144, GDN 16/16, tied.
    "qwen3.5-2b": _qwen35(24, hidden_size=2048, num_heads=8, num_kv_heads=2, intermediate_size=6144,
                          linear_num_value_heads=16, tie_word_embeddings=True),
    # [J][C]: 2560 hidden, 32 layers, 16/4 heads, MLP 9216, GDN 16/32, tied.
    "qwen3.5-4b": _qwen35(32, hidden_size=2560, num_heads=16, num_kv_heads=4, intermediate_size=9216,
                          linear_num_value_heads=32, tie_word_embeddings=True),
    # [T][J]: 4096 hidden, 32 layers, 16/4 heads, MLP 12288, GDN 16/32, untied.
    "qwen3.5-9b": _qwen35(32, hidden_size=4096, num_heads=16, num_kv_heads=4, intermediate_size=12288,
                          linear_num_value_heads=32),
    # [J][C]: 5120 hidden, 64 layers, 24/4 heads, MLP 17408, GDN 16/48, untied.
    "qwen3.5-27b": _qwen35(64, hidden_size=5120, num_heads=24, num_kv_heads=4, intermediate_size=17408,
                           linear_num_value_heads=48),
    # [J], and a partial copy (hidden, layers, heads, expert size).
    # 2048 hidden, 40 layers, 16/2 heads, 256 experts top-8 of 512, shared 512, GDN 16/32, untied.
    "qwen3.5-35b-a3b": _qwen35(40, hidden_size=2048, num_heads=16, num_kv_heads=2, intermediate_size=0,
                               linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8,
                               moe_intermediate_size=512, shared_expert_intermediate_size=512),
    # [J][C]: 3072 hidden, 48 layers, 32/2 heads, 256 experts top-8 of 1024, shared 1024, GDN 16/64, untied.
    "qwen3.5-122b-a10b": _qwen35(48, hidden_size=3072, num_heads=32, num_kv_heads=2, intermediate_size=0,
                                 linear_num_value_heads=64, num_experts=256, num_experts_per_tok=8,
                                 moe_intermediate_size=1024, shared_expert_intermediate_size=1024),
    # [J][C]: 4096 hidden, 60 layers, 32/2 heads, 512 experts top-10 of 1024, shared 1024, GDN 16/64, untied.
    "qwen3.5-397b-a17b": _qwen35(60, hidden_size=4096, num_heads=32, num_kv_heads=2, intermediate_size=0,
                                 linear_num_value_heads=64, num_experts=512, num_experts_per_tok=10,
                                 moe_intermediate_size=1024, shared_expert_intermediate_size=1024),
    # A small random model for `pcp-jax demo` and CPU experiments.
    "demo": ModelConfig(
        vocab_size=4096, hidden_size=256, num_layers=8, layer_types=_every_fourth_full(8),
        num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]

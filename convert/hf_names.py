"""Hugging Face Qwen3.5 checkpoint names -> our flat-param names: the rule table, the transforms, the shapes.

Our flat params (the contract with the model) are `{name: array}`, input-major (`y = x @ W`):

    embed [V, D]                         <- model.embed_tokens.weight
    final_norm [D]                       <- model.norm.weight
    lm_head [D, V]                       <- lm_head.weight.T          (absent when tie_word_embeddings)
    layers.{i}.input_norm / post_norm [D] <- input_layernorm / post_attention_layernorm .weight
    full attention:   attn.q_proj [D, Hq*2*hd] (per head [query | gate], as HF), attn.k_proj / v_proj
                      [D, Hkv*hd], attn.o_proj [Hq*hd, D], attn.q_norm / k_norm [hd]
    Gated DeltaNet:   gdn.in_proj_qkv [D, conv_dim], gdn.in_proj_z [D, Hv*dv], gdn.in_proj_b / in_proj_a
                      [D, Hv], gdn.conv_weight [K, conv_dim] (<- conv1d.weight [conv_dim, 1, K]),
                      gdn.A_log / dt_bias [Hv], gdn.norm [dv], gdn.out_proj [Hv*dv, D]
    dense MLP:        mlp.gate_proj / up_proj [D, F], mlp.down_proj [F, D]
    MoE:              moe.router [D, E], moe.gate_proj / up_proj [E, D, Fe], moe.down_proj [E, Fe, D],
                      and when shared_expert_intermediate_size > 0: moe.shared.gate_proj / up_proj [D, Fs],
                      moe.shared.down_proj [Fs, D], moe.shared_gate [D, 1]

Every 2-D HF `Linear.weight` ([out, in]) is transposed. HF stores experts either one tensor per expert
(`mlp.experts.{e}.gate_proj.weight` [Fe, D], ...) or fused (`mlp.experts.gate_up_proj` [E, 2Fe, D] with gate
the first Fe rows, `mlp.experts.down_proj` [E, D, Fe]); both give the same stacked arrays.

FP8 checkpoints (quantization.py): a weight stored as F8_E4M3 comes with its block scale `<weight
name>_scale_inv` (`...q_proj.weight_scale_inv` [ceil(out/128), ceil(in/128)], fused experts'
`mlp.experts.gate_up_proj_scale_inv`), which becomes our `<name>.scale` by the weight's own transform: the scale
grid of a transposed weight is transposed too, input-major [ceil(in/128), ceil(out/128)]
(pcp_jax.weights.contract_shapes). The values are kept as e4m3 bytes and the scales as float32.

HF names carry the prefix `model.` (text-only CausalLM) or `model.language_model.` (the multimodal model);
`lm_head.weight` is top level. The vision tower (`model.visual.*`) and the multi-token-prediction head
(`mtp.*`) are skipped. `plan(cfg, tensors)` checks a whole checkpoint against these rules from the headers
alone (names, shapes, dtypes) and fails with one `ConvertError` listing every problem.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from pcp_jax.config import ModelConfig
from pcp_jax.weights import SCALE, contract_shapes, declare, param_shapes

from .errors import ConvertError

# Weights must be floating point; integer or FP8 tensors mean a quantised checkpoint, which needs scales.
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")
FP8_DTYPE = "F8_E4M3"  # the values of an FP8 checkpoint's weights (quantization.py)

# HF name prefixes that are not part of the text model, with the reason shown in the log line.
SKIPPED_PREFIXES = {"model.visual.": "vision tower", "mtp.": "multi-token-prediction head"}


# The flat-param contract (names, shapes, streaming order), declared in pcp_jax.weights; the converter's name for it:
expected_shapes = param_shapes


def unit_of(name: str) -> str:
    """The storage unit of a flat-param name: `layers.{i}` for layer tensors, else the name itself (an FP8
    scale `<name>.scale` is stored with its weight)."""
    if name.startswith("layers."):
        return ".".join(name.split(".", 2)[:2])
    return name[: -len(SCALE)] if name.endswith(SCALE) else name


def is_scale_name(hf_name: str) -> bool:
    """Whether an HF tensor is an FP8 block scale (`...weight_scale_inv`, fused experts' `..._scale_inv`)."""
    return hf_name.endswith("_scale_inv")


def _scaled_weight_name(hf_name: str) -> str:
    """The HF weight an FP8 scale belongs to: `x.weight_scale_inv` -> `x.weight`, `x.gate_up_proj_scale_inv` ->
    `x.gate_up_proj`."""
    return hf_name[: -len("_scale_inv")]


# Transforms -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Transform:
    """How one HF tensor becomes (part of) one of ours. `apply` only takes views (transpose, slice), so it
    costs no memory until the caller copies into the output dtype. `hf_shape` maps our target shape to the
    HF shape that must be stored (for per-expert pieces: the shape of one expert's tensor)."""

    name: str
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    apply: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda s: s, lambda x: x)
TRANSPOSE = Transform("transpose", lambda s: s[::-1], lambda x: x.T)
# conv1d.weight is [conv_dim, 1, K] (depthwise: one input channel per group).
CONV = Transform("conv1d [C, 1, K] -> [K, C]", lambda s: (s[1], 1, s[0]), lambda x: x[:, 0, :].T)
# One expert's Linear weight, transposed into its slot of the stacked [E, in, out] array.
EXPERT_TRANSPOSE = Transform("expert transpose", lambda s: (s[2], s[1]), lambda x: x.T)
FUSED_GATE = Transform("gate half of gate_up_proj [E, 2Fe, D]", lambda s: (s[0], 2 * s[2], s[1]),
                       lambda x: x[:, : x.shape[1] // 2, :].transpose(0, 2, 1))
FUSED_UP = Transform("up half of gate_up_proj [E, 2Fe, D]", lambda s: (s[0], 2 * s[2], s[1]),
                     lambda x: x[:, x.shape[1] // 2:, :].transpose(0, 2, 1))
FUSED_DOWN = Transform("fused down_proj [E, D, Fe]", lambda s: (s[0], s[2], s[1]),
                       lambda x: x.transpose(0, 2, 1))


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` is matched against the whole canonical HF name (prefix `model.`); every target is an
    our-name template formatted with the pattern's named groups (`layer`, and `expert` for per-expert)."""

    pattern: re.Pattern
    targets: tuple[tuple[str, Transform], ...]


def _rule(pattern: str, *targets: tuple[str, Transform]) -> Rule:
    return Rule(re.compile(pattern.replace(".", r"\.").replace("{L}", r"(?P<layer>\d+)")
                           .replace("{E}", r"(?P<expert>\d+)")), targets)


_L = "model.layers.{L}."
RULES: tuple[Rule, ...] = (
    _rule("model.embed_tokens.weight", ("embed", IDENTITY)),
    _rule("model.norm.weight", ("final_norm", IDENTITY)),
    _rule("lm_head.weight", ("lm_head", TRANSPOSE)),
    _rule(_L + "input_layernorm.weight", ("layers.{layer}.input_norm", IDENTITY)),
    _rule(_L + "post_attention_layernorm.weight", ("layers.{layer}.post_norm", IDENTITY)),
    *(_rule(_L + f"self_attn.{p}.weight", (f"layers.{{layer}}.attn.{p}", TRANSPOSE))
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(_rule(_L + f"self_attn.{n}.weight", (f"layers.{{layer}}.attn.{n}", IDENTITY)) for n in ("q_norm", "k_norm")),
    *(_rule(_L + f"linear_attn.{p}.weight", (f"layers.{{layer}}.gdn.{p}", TRANSPOSE))
      for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")),
    _rule(_L + "linear_attn.conv1d.weight", ("layers.{layer}.gdn.conv_weight", CONV)),
    _rule(_L + "linear_attn.A_log", ("layers.{layer}.gdn.A_log", IDENTITY)),
    _rule(_L + "linear_attn.dt_bias", ("layers.{layer}.gdn.dt_bias", IDENTITY)),
    _rule(_L + "linear_attn.norm.weight", ("layers.{layer}.gdn.norm", IDENTITY)),
    *(_rule(_L + f"mlp.{p}.weight", (f"layers.{{layer}}.mlp.{p}", TRANSPOSE)) for p in ("gate_proj", "up_proj", "down_proj")),
    _rule(_L + "mlp.gate.weight", ("layers.{layer}.moe.router", TRANSPOSE)),
    *(_rule(_L + f"mlp.experts.{{E}}.{p}.weight", (f"layers.{{layer}}.moe.{p}", EXPERT_TRANSPOSE))
      for p in ("gate_proj", "up_proj", "down_proj")),
    _rule(_L + "mlp.experts.gate_up_proj",
          ("layers.{layer}.moe.gate_proj", FUSED_GATE), ("layers.{layer}.moe.up_proj", FUSED_UP)),
    _rule(_L + "mlp.experts.down_proj", ("layers.{layer}.moe.down_proj", FUSED_DOWN)),
    *(_rule(_L + f"mlp.shared_expert.{p}.weight", (f"layers.{{layer}}.moe.shared.{p}", TRANSPOSE))
      for p in ("gate_proj", "up_proj", "down_proj")),
    _rule(_L + "mlp.shared_expert_gate.weight", ("layers.{layer}.moe.shared_gate", TRANSPOSE)),
)


def canonical_name(hf_name: str) -> str:
    """`model.language_model.X` (multimodal checkpoints) -> `model.X`; other names unchanged."""
    if hf_name.startswith("model.language_model."):
        return "model." + hf_name[len("model.language_model."):]
    return hf_name


# The plan -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor feeding one of our tensors; `expert` is its slot in a stacked expert array, or None."""

    hf_name: str
    transform: Transform
    expert: int | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """How to build our tensor `name` of `shape`: from one piece, or from one piece per expert (in order).
    `kind`: "float" (a floating-point tensor), "fp8" (e4m3 values kept as they are) or "scale" (an FP8 block
    scale, float32)."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    kind: str = "float"


@dataclasses.dataclass(frozen=True)
class Plan:
    """`sources` in streaming order (see `expected_shapes`); `skipped` maps a reason to the HF names ignored
    for it; `tied_lm_head` names a stored `lm_head.weight` of a tied model, to be checked equal to embed."""

    sources: dict[str, Source]
    skipped: dict[str, list[str]]
    tied_lm_head: str | None


class TensorHeader(Protocol):
    shape: tuple[int, ...]
    dtype: str


def plan(cfg: ModelConfig, tensors: Mapping[str, TensorHeader], fp8: bool = False) -> Plan:
    """Match every HF tensor (name -> header with `.shape` and safetensors `.dtype`) to our names.

    `fp8`: the checkpoint is an FP8 one (quantization.checkpoint_quantization said so): F8_E4M3 matrices with
    their scales are expected, each F8_E4M3 weight (every expert of it) with its scale and each scale with its
    F8_E4M3 weight. Raises ConvertError listing every unexpected, conflicting, missing, wrongly shaped or
    non-float tensor.
    """
    matrices = {n for n, w in declare(cfg).items() if len(w.shape) >= 2}
    stored_fp8 = set()
    if fp8:  # which of our tensors the checkpoint stores in FP8 (a pre-pass: the scales' shapes depend on it)
        for hf_name, header in tensors.items():
            if header.dtype == FP8_DTYPE and not hf_name.startswith(tuple(SKIPPED_PREFIXES)):
                stored_fp8.update(t for t, _, _ in _match(canonical_name(hf_name)) or () if t in matrices)
    shapes = contract_shapes(cfg, stored_fp8)
    pieces: dict[str, dict[int | None, Piece]] = {}
    dtypes: dict[str, set[str]] = {}
    skipped: dict[str, list[str]] = {}
    unexpected, conflicts, bad_shape, bad_dtype = [], [], [], []
    tied_lm_head = None

    for hf_name, header in tensors.items():
        reason = next((why for p, why in SKIPPED_PREFIXES.items() if hf_name.startswith(p)), None)
        if reason:
            skipped.setdefault(reason, []).append(hf_name)
            continue
        canon = canonical_name(hf_name)
        if canon == "lm_head.weight" and cfg.tie_word_embeddings:
            if tuple(header.shape) != shapes["embed"]:
                bad_shape.append(f"{hf_name}: shape {tuple(header.shape)}, expected {shapes['embed']} "
                                 f"(tied to embed_tokens)")
            tied_lm_head = hf_name
            continue
        if (not cfg.shared_expert_intermediate_size and cfg.is_moe
                and re.search(r"\.mlp\.shared_expert(_gate)?\.", canon)):
            # HF builds a shared expert even when its size is 0; its output is then identically 0.
            skipped.setdefault("shared expert of size 0", []).append(hf_name)
            continue
        scale = fp8 and is_scale_name(canon)
        matched = _match(_scaled_weight_name(canon) if scale else canon)
        if matched is None:
            unexpected.append(f"{hf_name} (no rule)")
            continue
        if header.dtype not in FLOAT_DTYPES and not (fp8 and header.dtype == FP8_DTYPE and not scale):
            bad_dtype.append(f"{hf_name}: {header.dtype}")
        for target, transform, expert in matched:
            if scale:
                if target not in stored_fp8:
                    unexpected.append(f"{hf_name} (a scale of {target}, which the checkpoint does not store in "
                                      f"{FP8_DTYPE})")
                    continue
                target += SCALE
            elif target in stored_fp8:
                dtypes.setdefault(target, set()).add(header.dtype)
            if target not in shapes:
                unexpected.append(f"{hf_name} (would be {target}, which this config.json does not have)")
                continue
            if expert is not None and expert >= cfg.num_experts:
                unexpected.append(f"{hf_name} (expert {expert}, but num_experts={cfg.num_experts})")
                continue
            want = transform.hf_shape(shapes[target])
            if tuple(header.shape) != want:
                bad_shape.append(f"{hf_name}: shape {tuple(header.shape)}, expected {want} for {target} "
                                 f"{shapes[target]}")
            slots = pieces.setdefault(target, {})
            # A whole tensor conflicts with anything else for its target; an expert slice with its own slot
            # or with a fused (whole) tensor.
            clash = next(iter(slots.values()), None) if expert is None else slots.get(expert, slots.get(None))
            if clash is not None:
                conflicts.append(f"{target}: from both {clash.hf_name} and {hf_name}")
                continue
            slots[expert] = Piece(hf_name, transform, expert)
    bad_dtype += [f"{name}: its experts mix {sorted(kinds)} (all {FP8_DTYPE} with scales, or none)"
                  for name, kinds in dtypes.items() if kinds != {FP8_DTYPE}]

    missing = []
    for name in shapes:
        slots = pieces.get(name, {})
        if not slots:
            missing.append(name)
        elif None not in slots:
            absent = [e for e in range(cfg.num_experts) if e not in slots]
            if absent:
                missing.append(f"{name} experts {_short(absent)}")

    allowed = FLOAT_DTYPES + ((FP8_DTYPE,) if fp8 else ())
    problems = [(f"unexpected tensors ({len(unexpected)})", unexpected),
                (f"conflicting sources ({len(conflicts)})", conflicts),
                (f"missing tensors ({len(missing)})", missing),
                (f"wrong shapes ({len(bad_shape)})", bad_shape),
                (f"unsupported dtypes ({len(bad_dtype)}; expected one of {list(allowed)}"
                 f"{', F8_E4M3 only for weights with a weight_scale_inv' if fp8 else ''})", bad_dtype)]
    problems = [(title, items) for title, items in problems if items]
    if problems:
        lines = [f"the checkpoint does not match its config.json ({_describe(cfg)}):"]
        for title, items in problems:
            lines.append(f"  {title}:")
            lines.extend(f"    {item}" for item in items[:40])
            if len(items) > 40:
                lines.append(f"    ... and {len(items) - 40} more")
        raise ConvertError("\n".join(lines))

    sources = {}
    for name, shape in shapes.items():
        slots = pieces[name]
        order = [None] if None in slots else range(cfg.num_experts)
        kind = "scale" if name.endswith(SCALE) else "fp8" if name in stored_fp8 else "float"
        sources[name] = Source(name, shape, tuple(slots[e] for e in order), kind)
    return Plan(sources=sources, skipped=skipped, tied_lm_head=tied_lm_head)


def _match(canon: str) -> list[tuple[str, Transform, int | None]] | None:
    for rule in RULES:
        m = rule.pattern.fullmatch(canon)
        if m:
            groups = m.groupdict()
            expert = int(groups["expert"]) if groups.get("expert") is not None else None
            return [(template.format(**groups), transform, expert) for template, transform in rule.targets]
    return None


def _short(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 8 else f"{xs[:8]} ... ({len(xs)} in all)"


def _describe(cfg: ModelConfig) -> str:
    kind = f"MoE {cfg.num_experts} experts" if cfg.is_moe else "dense"
    return (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {kind}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings}")

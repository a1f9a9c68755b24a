"""Memory per device: weights, KV cache, GDN state, prefill activations, and the longest prompt that fits.

Every figure is in bytes on ONE device of the ("cp", "tp") mesh (cp·tp devices; tp = 1 is the plain cp mesh):
- weights: replicated over `cp`; over `tp`, each tensor as pcp_jax.weights declares it (heads, intermediate,
  experts, vocabulary split; norms, router and shared_gate replicated; KV heads and GDN key heads fewer than
  tp repeated so that each rank holds one): its shape on one rank is `parallel.tensor.device_shapes`; with FP8
  weights (`weights="fp8"`, pcp_jax.fp8) the matrices declared with a BlockScale take one byte per element
  plus their float32 block scales on the rank (`parallel.tensor.fp8_scale_shapes`);
- KV cache: full-attention layers keep K and V of `num_kv_heads` heads of `head_dim` per token; prompt tokens
  are split over `cp` and heads over `tp`, so a device holds 2 · n_attention · (KV heads of one rank:
  `local_config(cfg, tp).num_kv_heads`) · head_dim · dtype bytes / cp per prompt token;
- GDN state: per sequence, every GDN layer's conv window (K-1 tokens of the rank's conv channels, in the model
  dtype) and recurrent state (value heads / tp x dk x dv, fp32), replicated over cp;
- activations: `activation_bytes_per_token` (a bound on one prefill piece's temporaries) per token
  of the piece held by this device (piece tokens / cp).
Per-rank counts come from `pcp_jax.parallel.tensor.local_config` (one shard's config), so every function here
refuses a `tp` that does not split the model, with the message loading gives (`check_tp`).

`memory_report(model)` reads a built model (its actual weights, piece size and bucket ladder);
`memory_estimate(cfg, ...)` computes the same from a ModelConfig alone, before any weight is allocated, with
the piece size and bucket ladder a `Model` would pick by default. `max_prompt_tokens` is the longest single
prompt (batch 1, no new tokens) whose weights + KV cache (as the engine allocates it: padded to the bucket
and capacity ladders) + GDN state + one piece's activations fit `budget_bytes`; it ignores XLA's own
buffers and fragmentation, and the decode room a `warmup` reserves, so leave some margin.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from pcp_jax.buckets import STEPS, capacity, ladder_down, plan_pieces
from pcp_jax.config import ModelConfig
from pcp_jax.parallel.tensor import check_tp, device_shapes, fp8_scale_shapes, local_config
from pcp_jax.weights import declare, device_itemsize

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}  # the model dtypes, by name
WEIGHTS = ("model", "dequantize", "fp8", "fp8-w8a8")  # how weights are held: in the model dtype, or FP8 (pcp_jax.fp8)
CPU_PREFILL_BUDGET = 2 << 30  # activation bytes per device for chunk_size="auto" where memory is not reported

_NO_POSITION_LIMIT = 1 << 31  # search bound for configs that state no max_position_embeddings


def weights_bytes_per_device(cfg: ModelConfig, tp: int, dtype_bytes: int, fp8: bool = False) -> int:
    """Bytes of the parameters one device holds under tensor parallelism `tp` (every tensor's shape on one rank,
    `device_shapes`), weights declared in the model dtype taking `dtype_bytes` each (pcp_jax.weights); with
    `fp8`, the matrices declared with a BlockScale one byte per element plus 4 per block scale. tp = 1: the
    whole model."""
    weights = declare(cfg)
    scales = fp8_scale_shapes(cfg, tp) if fp8 else {}
    return sum(math.prod(shape) * (1 if name in scales else device_itemsize(weights[name], dtype_bytes))
               + 4 * math.prod(scales.get(name, (0,)))
               for name, shape in device_shapes(cfg, tp).items())


def activation_bytes_per_token(cfg: ModelConfig, dtype_bytes: int, tp: int = 1) -> int:
    """A bound in bytes on the prefill temporaries per local token of one piece on one device (the widest
    layer's live arrays, doubled for XLA's buffers), used to size `chunk_size="auto"` pieces; the piece's logits
    are extra. Under tp the head- and intermediate-wide arrays are the rank's share; the D-wide ones (residual,
    block outputs before their all-reduce) and the routed-expert rows are not divided: every rank routes all its
    tokens and how many (token, expert) pairs land on its experts depends on the data, up to all k."""
    b, D, local = dtype_bytes, cfg.hidden_size, local_config(cfg, tp)
    H, dk, dv = local.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    gdn = 2 * local.conv_dim * b + 2 * local.linear_key_dim * 4 + H * (dv + dk) * (b + 4) \
        + H * dv * (4 + b) + 2 * H * 4
    attn = (2 * local.num_heads + 2 * local.num_kv_heads) * cfg.head_dim * b + 3 * local.num_heads * cfg.head_dim * 4
    if cfg.is_moe:
        k = cfg.num_experts_per_tok
        mlp = k * (2 * D + 3 * cfg.moe_intermediate_size) * b + cfg.num_experts * 4 \
            + 3 * local.shared_expert_intermediate_size * b
    else:
        mlp = 3 * local.intermediate_size * b
    return 2 * (4 * D * b + max(gdn, attn, mlp))


def kv_bytes_per_token(cfg: ModelConfig, cp: int, dtype_bytes: int, tp: int = 1) -> float:
    """KV-cache bytes one device holds per prompt token (K and V of every full-attention layer: the rank's
    KV heads, 1/cp of the tokens)."""
    return 2 * len(cfg.attention_layers) * local_config(cfg, tp).num_kv_heads * cfg.head_dim * dtype_bytes / cp


def gdn_state_bytes(cfg: ModelConfig, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes of one sequence's GDN state on each device: conv windows of the rank's conv channels (model
    dtype) + fp32 recurrent states of its Hv/tp value heads, every GDN layer (replicated over cp)."""
    local = local_config(cfg, tp)
    conv = (cfg.conv_kernel - 1) * local.conv_dim * dtype_bytes
    recurrent = local.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return len(cfg.gdn_layers) * (conv + recurrent)


def state_bytes_per_device(state) -> int:
    """Bytes of a model state's leaves on one device (each leaf's first addressable shard)."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state))


def default_prefill_budget(weights_bytes: int, budget_bytes: int | None) -> int:
    """The activation budget a `Model` picks by default: 40% of the device memory left after the weights
    (0 when they do not fit), or CPU_PREFILL_BUDGET where the memory is not known."""
    return CPU_PREFILL_BUDGET if budget_bytes is None else max(0, int(0.4 * (budget_bytes - weights_bytes)))


def auto_piece_tokens(cfg: ModelConfig, cp: int, dtype_bytes: int, prefill_budget_bytes: int, tp: int = 1) -> int:
    """The piece length (tokens over all of cp) of chunk_size="auto" for an activation budget in bytes per
    device, as `Model` computes it."""
    unit = 2 * cp * 64
    per_token = activation_bytes_per_token(cfg, dtype_bytes, tp)
    return ladder_down(max(unit, prefill_budget_bytes // per_token * cp), unit)


def prompt_bytes(cfg: ModelConfig, cp: int, dtype_bytes: int, n: int, piece_tokens: int,
                 bucket_steps: int | None, tp: int = 1) -> int:
    """Bytes per device beyond the weights that prefilling one prompt of n tokens needs: the KV cache as
    the engine allocates it (pieces padded to the bucket ladder, slots to the capacity ladder), the GDN
    state, and one piece's activations. A prompt longer than one piece is charged the largest piece (that of
    a prompt exactly `piece_tokens` long: its own pieces are at most that), which keeps the figure
    non-decreasing in n."""
    plan = lambda tokens: plan_pieces(tokens, cp, "auto", piece_tokens, steps=bucket_steps)
    pieces = plan(n)
    slots = capacity(pieces.count * pieces.n_pad // cp)
    kv = 2 * len(cfg.attention_layers) * slots * local_config(cfg, tp).num_kv_heads * cfg.head_dim * dtype_bytes
    active = pieces.n_pad if pieces.count == 1 else plan(piece_tokens).n_pad
    return kv + gdn_state_bytes(cfg, dtype_bytes, tp) + activation_bytes_per_token(cfg, dtype_bytes, tp) * active // cp


def max_prompt_tokens(cfg: ModelConfig, cp: int, dtype_bytes: int, weights_bytes: int, budget_bytes: int,
                      piece_tokens: int, bucket_steps: int | None, tp: int = 1) -> int:
    """The longest prompt (batch 1, no new tokens, at most max_position_embeddings) whose weights +
    `prompt_bytes` fit `budget_bytes` per device; 0 when not even one token fits."""
    room = budget_bytes - weights_bytes
    lo, hi = 0, cfg.max_position_embeddings or _NO_POSITION_LIMIT
    while lo < hi:  # invariant: lo fits (or is 0); everything above hi does not
        mid = (lo + hi + 1) // 2
        if prompt_bytes(cfg, cp, dtype_bytes, mid, piece_tokens, bucket_steps, tp) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _report(cfg: ModelConfig, cp: int, dtype: str, weights_bytes: int, budget_bytes: int | None,
            prefill_budget_bytes: int, piece_tokens: int, bucket_steps: int | None, tp: int = 1,
            weights: str = "model") -> dict:
    b = jnp.dtype(DTYPES[dtype]).itemsize
    per_local_token = activation_bytes_per_token(cfg, b, tp)
    return {
        "cp": cp,
        "tp": tp,
        "devices": cp * tp,
        "dtype": dtype,
        "weights": weights,
        "weights_bytes": weights_bytes,
        "model_weights_bytes": weights_bytes_per_device(cfg, 1, b, fp8=weights == "fp8"),
        "kv_heads_per_device": local_config(cfg, tp).num_kv_heads,
        "gdn_value_heads_per_device": local_config(cfg, tp).linear_num_value_heads,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, cp, b, tp),
        "gdn_state_bytes_per_sequence": gdn_state_bytes(cfg, b, tp),
        "activation_bytes_per_local_token": per_local_token,
        "prefill_budget_bytes": prefill_budget_bytes,
        "piece_tokens": piece_tokens,
        "piece_activation_bytes": per_local_token * piece_tokens // cp,
        "budget_bytes": budget_bytes,
        "max_prompt_tokens": None if budget_bytes is None else max_prompt_tokens(
            cfg, cp, b, weights_bytes, budget_bytes, piece_tokens, bucket_steps, tp),
    }


def _check_budget(budget_bytes) -> int | None:
    """`budget_bytes` as a Python int (None stays None); ValueError unless a positive integer or None."""
    if budget_bytes is None:
        return None
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes={budget_bytes!r} must be a positive integer (bytes per device) or None")
    return int(budget_bytes)


def device_memory_stats(mesh) -> dict | None:
    """The allocator's statistics of one of this process's devices in `mesh` (bytes_limit, bytes_in_use, ...),
    or None where the backend does not report a limit (e.g. CPU)."""
    mine = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    stats = mine.memory_stats() if hasattr(mine, "memory_stats") else None
    return stats if stats and "bytes_limit" in stats else None


def device_memory_limit(mesh) -> int | None:
    """The memory limit in bytes of one of this process's devices in `mesh` (None where not reported)."""
    stats = device_memory_stats(mesh)
    return None if stats is None else stats["bytes_limit"]


def memory_report(model, budget_bytes: int | None = None) -> dict:
    """Memory per device of a built `engine.Model` (keys and units: `memory_estimate`). Weights are the bytes
    of the model's state on one device; `budget_bytes` defaults to the device's memory limit where the
    backend reports it. A model without a `tp` attribute runs at tp = 1."""
    budget_bytes = _check_budget(budget_bytes)
    if budget_bytes is None:
        budget_bytes = device_memory_limit(model.mesh)
    return _report(model.cfg, model.cp, model.dtype_name, state_bytes_per_device(model.weights), budget_bytes,
                   model.prefill_budget_bytes, model.auto_piece_tokens, model.bucket_steps, getattr(model, "tp", 1),
                   "fp8" if getattr(model, "weights_mode", "model").startswith("fp8") else "model")


def memory_estimate(cfg: ModelConfig, cp: int = 1, dtype: str = "bfloat16", budget_bytes: int | None = None,
                    tp: int = 1, weights: str = "model") -> dict:
    """Memory per device of `cfg` on a ("cp", "tp") mesh of cp·tp devices, from the config alone (nothing is
    allocated), for a `Model` with default settings on devices of `budget_bytes` memory each (None: unknown, as
    on CPU), its weights held as `weights` says (WEIGHTS: "model"/"dequantize" in `dtype`, "fp8"/"fp8-w8a8" as
    an FP8 checkpoint's on a Hopper GPU). A `tp` that does not split `cfg` is refused as `load_model` refuses it
    (`check_tp`). Returns: cp, tp, devices (cp·tp), dtype, weights;
    weights_bytes (on one device); model_weights_bytes (one whole copy of the model); kv_heads_per_device;
    gdn_value_heads_per_device; kv_bytes_per_token (per prompt token, float); gdn_state_bytes_per_sequence;
    activation_bytes_per_local_token; prefill_budget_bytes (activations one piece may use); piece_tokens
    (chunk_size="auto" piece, tokens over all of cp); piece_activation_bytes; budget_bytes; max_prompt_tokens
    (None without a budget). `weights` in the result is "model" or "fp8". All sizes are bytes per device unless
    named otherwise."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={cfg!r:.80} must be a ModelConfig (pcp_jax.preset(name) or "
                         f"ModelConfig.from_hf_file(path))")
    for name, value in (("cp", cp), ("tp", tp)):  # numpy integers too, as Model takes them
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    cp, tp = int(cp), int(tp)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; expected one of {list(WEIGHTS)}")
    budget_bytes = _check_budget(budget_bytes)
    check_tp(cfg, tp)
    b = jnp.dtype(DTYPES[dtype]).itemsize
    held = weights_bytes_per_device(cfg, tp, b, fp8=weights.startswith("fp8"))
    prefill_budget = default_prefill_budget(held, budget_bytes)
    return _report(cfg, cp, dtype, held, budget_bytes, prefill_budget,
                   auto_piece_tokens(cfg, cp, b, prefill_budget, tp), STEPS, tp,
                   "fp8" if weights.startswith("fp8") else "model")


def format_memory_report(report: dict) -> str:
    """A short table of a `memory_report` / `memory_estimate` result, sizes in GiB (MiB below 1 GiB)."""
    if not isinstance(report, dict) or "weights_bytes" not in report:
        raise ValueError(f"report={report!r:.80} must be the dict of memory_report or memory_estimate")

    def size(n) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

    budget = report["budget_bytes"]
    if budget is None:
        longest = "unknown (no budget)"
    elif report["weights_bytes"] > budget:
        longest = "0 tokens (the weights alone exceed the budget)"
    else:
        longest = f"{report['max_prompt_tokens']} tokens"
    rows = [
        ("weights", size(report["weights_bytes"])
         + (f" (of {size(report['model_weights_bytes'])} in all)" if report["tp"] > 1 else "")),
        ("KV cache per prompt token", f"{report['kv_bytes_per_token'] / 2**10:.2f} KiB"),
        ("GDN state per sequence", size(report["gdn_state_bytes_per_sequence"])),
        ("prefill piece", f"{report['piece_tokens']} tokens, {size(report['piece_activation_bytes'])} activations"),
        ("budget", "unknown" if budget is None else size(budget)),
        ("longest prompt that fits", longest),
    ]
    width = max(len(name) for name, _ in rows)
    fp8 = ", FP8 weights" if report.get("weights") == "fp8" else ""
    head = f"memory per device (cp={report['cp']}, tp={report['tp']}, {report['dtype']}{fp8})"
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


def check_request(cfg: ModelConfig, mesh, dtype_bytes: int, tp: int, batch: int, n: int, max_new_tokens: int,
                  slots: int) -> None:
    """Refuse, before allocating or compiling anything, a request beyond the model's positions or the device
    memory: n prompt tokens + max_new_tokens, batch rows, `slots` KV slots per rank."""
    import os
    limit = cfg.max_position_embeddings
    if limit and n + max_new_tokens > limit:
        raise ValueError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"{limit} positions (max_position_embeddings)")
    kv = kv_bytes_per_token(cfg, 1, dtype_bytes, tp=tp) * batch * slots
    stats, where = device_memory_stats(mesh), "per device"
    free = None if stats is None else stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if free is None and mesh.devices.flat[0].platform == "cpu":
        # CPU devices share the host's memory: refuse what cannot fit in all of it (what is free right now
        # would refuse requests the page cache could make room for)
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // mesh.size
        where = "per CPU device (host memory)"
    if free is not None and kv > free:
        hint = "" if "host memory" in where else (
            "; JAX takes XLA_PYTHON_CLIENT_MEM_FRACTION of each GPU (0.75 unless set): a model that fills most of "
            "a GPU may need e.g. 0.95")
        raise ValueError(f"the KV cache for {n} prompt tokens + {max_new_tokens} new tokens x batch {batch} needs "
                         f"{kv / 2**30:.1f} GiB {where}; {free / 2**30:.1f} GiB are available (use a larger cp or tp, "
                         f"fewer tokens or a smaller batch{hint})")

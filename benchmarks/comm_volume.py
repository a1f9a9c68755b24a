"""Communication volume per layer and rank of prefill context parallelism, a paper model of the
prefill time of the 9B shape under cp, and the bytes of a ("cp", "tp") mesh for the large MoE presets
(docs/communication.md, docs/BENCHMARKS.md).

  python benchmarks/comm_volume.py            prints every table (markdown)

cp-only volumes come from `pcp_jax.parallel.gdn_cp.communication_bytes` (bf16 activations, fp32 GDN maps);
the cp x tp volumes from `prefill_volumes` / `decode_volumes` below (the same formulas on each tp rank's heads,
plus the tp all-reduces), weights per device from `pcp_jax.memory.weights_bytes_per_device` and each tensor's
shape on one rank from `pcp_jax.parallel.tensor.device_shapes`. Everything here is a model (formulas), not a
measurement: the time model's inputs are the single-H100 kernel figures measured in docs/BENCHMARKS.md and an
assumed NVLink bandwidth (benchmarks/peaks.py); no cp x tp figure has been measured yet.
"""

from __future__ import annotations

import math

from peaks import DEVICES, NVLINK_GBPS  # benchmarks/ is on sys.path when a benchmark runs
from pcp_jax.config import PRESETS
from pcp_jax.memory import kv_bytes_per_token, memory_estimate, weights_bytes_per_device
from pcp_jax.parallel.gdn_cp import communication_bytes
from pcp_jax.parallel.tensor import device_shapes, local_config

MB = 1e6


def volume_table(tokens: int = 131072) -> str:
    lines = [f"Per layer and per rank, prompt of {tokens // 1024}k tokens, bf16 activations.",
             "", "| model | batch | C | ring attention (K/V sent) | GDN `batch` (all_to_all) | GDN `sequence` (maps + halos) |",
             "|---|---|---|---|---|---|"]
    for name in ("qwen3.5-9b", "qwen3.5-397b-a17b"):
        cfg = PRESETS[name]
        for C in (2, 4, 8):
            for B in (1, C):
                v = communication_bytes(cfg, B, tokens, C)
                batch = f"{v['gdn_batch'] / MB:,.1f} MB" if B % C == 0 else "n/a (B % C != 0)"
                lines.append(f"| {name} | {B} | {C} | {v['ring_attention'] / MB:,.1f} MB | {batch} | "
                             f"{v['gdn_sequence'] / MB:,.2f} MB |")
    return "\n".join(lines)


# Inputs of the time model (single H100, bf16), each measured in docs/BENCHMARKS.md except the link.
GDN_MS_PER_LAYER_128K = 9.0      # our Pallas GDN, 128k tokens, 32 v heads (FLA: 8.79 ms)
ATTN_TFLOPS = 640.0              # tokamax flash attention at hd 256, long causal/unmasked steps
MATMUL_TFLOPS = 600.0            # assumed achievable share of the bf16 matmul peak (peaks.BF16_TFLOPS)
LINK_GBPS = NVLINK_GBPS          # ASSUMED NVLink point-to-point bandwidth per direction (not measured)


def time_model(tokens: int = 131072) -> str:
    cfg = PRESETS["qwen3.5-9b"]
    D, n = cfg.hidden_size, tokens
    mm_params = 0
    for t in cfg.layer_types:
        if t == "full_attention":
            mm_params += D * (cfg.num_heads * 2 * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim) + cfg.num_heads * cfg.head_dim * D
        else:
            mm_params += D * (cfg.conv_dim + cfg.linear_value_dim + 2 * cfg.linear_num_value_heads) + cfg.linear_value_dim * D
        mm_params += 3 * D * cfg.intermediate_size
    n_attn, n_gdn = len(cfg.attention_layers), len(cfg.gdn_layers)
    lines = [f"qwen3.5-9b, one prompt of {n // 1024}k tokens (B = 1, GDN `sequence` strategy), bf16, H100.",
             f"Inputs: matmuls at {MATMUL_TFLOPS:.0f} TFLOP/s, attention at {ATTN_TFLOPS:.0f} TFLOP/s, GDN "
             f"{GDN_MS_PER_LAYER_128K} ms per layer at 128k (x2 work under `sequence` for the [v|0] columns), "
             f"link {LINK_GBPS:.0f} GB/s per direction (assumed).", "",
             "| C | matmuls (ms) | attention (ms) | GDN (ms) | K/V per ring step (ms) | attention step (ms) | TTFT model (ms) | speed-up | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = None
    for C in (1, 2, 4, 8):
        mm = 2 * n * mm_params / C / (MATMUL_TFLOPS * 1e12) * 1e3
        attn = n_attn * 4 * cfg.num_heads * cfg.head_dim * n * n / 2 / C / (ATTN_TFLOPS * 1e12) * 1e3
        gdn = n_gdn * GDN_MS_PER_LAYER_128K * (n / 131072) / C * (2 if C > 1 else 1)
        kv_bytes = 2 * (n // C) * cfg.num_kv_heads * cfg.head_dim * 2
        step_comm = kv_bytes / (LINK_GBPS * 1e9) * 1e3 if C > 1 else 0.0
        step_attn = attn / n_attn / C if C > 1 else attn / n_attn
        exposed = n_attn * max(0.0, step_comm - step_attn) * (C - 1)  # what the overlap cannot hide
        total = mm + attn + gdn + exposed
        base = base or total
        lines.append(f"| {C} | {mm:.0f} | {attn:.0f} | {gdn:.0f} | {step_comm:.2f} | {step_attn:.2f} | {total:.0f} | "
                     f"{base / total:.2f}x | {base / total / C:.0%} |")
    return "\n".join(lines)


# The cp x tp tables: the large MoE presets on the factorizations of 4 and 8 devices.
CP_TP_MODELS = ("qwen3.5-122b-a10b", "qwen3.5-397b-a17b")
FACTORIZATIONS = ((4, 1), (2, 2), (1, 4), (8, 1), (4, 2), (2, 4), (1, 8))
H200_BYTES = 141 << 30           # memory per H200 as the tests and README size it
H200_HBM_GBPS = DEVICES["H200"].hbm_tbps * 1000  # nominal H200 HBM bandwidth (spec sheet, not measured)


def allreduce_bytes(buffer_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of `buffer_bytes` over n ranks: 2 · (n-1)/n of the buffer."""
    return 2 * (n - 1) / n * buffer_bytes


def allgather_bytes(piece_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-gather of one `piece_bytes` piece per rank over n ranks: (n-1) pieces."""
    return (n - 1) * piece_bytes


def prefill_volumes(cfg, tokens: int, cp: int, tp: int, batch: int = 1, act_bytes: int = 2) -> dict[str, float]:
    """Bytes one rank sends per layer in a prefill of `tokens` tokens on a (cp, tp) mesh, GDN `sequence`
    strategy: ring K/V per full-attention layer (its KV heads, over cp), GDN chunk maps (fp32, its Hv/tp value
    heads) and conv halos (its conv channels) per GDN layer (over cp), the two tp all-reduces of the block
    outputs [B, N/C, D] per layer; and `per_prefill`, the sum over every layer plus the embedding all-reduce."""
    t_local, local = tokens // cp, local_config(cfg, tp)
    ring = (cp - 1) * batch * t_local * 2 * local.num_kv_heads * cfg.head_dim * act_bytes
    hv, dk, dv = local.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    maps = (cp - 1) * batch * 2 * hv * dk * (dv + dk) * 4
    halos = 2 * batch * (cfg.conv_kernel - 1) * local.conv_dim * act_bytes if cp > 1 else 0
    block = allreduce_bytes(batch * t_local * cfg.hidden_size * act_bytes, tp)
    per_prefill = len(cfg.attention_layers) * ring + len(cfg.gdn_layers) * (maps + halos) \
        + (2 * cfg.num_layers + 1) * block
    return {"ring_attention": ring, "gdn_sequence": maps + halos, "tp_allreduce": 2 * block,
            "per_prefill": per_prefill}


def decode_volumes(cfg, cp: int, tp: int, batch: int = 1, act_bytes: int = 2) -> dict[str, float]:
    """Bytes one rank sends per decode step: per full-attention layer the cp all-gather of its partial output
    and LSE for its Hq/tp query heads (fp32); per layer the two tp all-reduces of [B, 1, D]; per step the sum
    over layers plus the embedding all-reduce and the tp all-gather of the fp32 logits [B, V]."""
    hq = cfg.num_heads // tp
    partial = allgather_bytes(batch * hq * (cfg.head_dim + 1) * 4, cp)
    block = allreduce_bytes(batch * cfg.hidden_size * act_bytes, tp)
    logits = allgather_bytes(batch * cfg.vocab_size // tp * 4, tp)
    per_step = len(cfg.attention_layers) * partial + (2 * cfg.num_layers + 1) * block + logits
    return {"attention_partials": partial, "tp_allreduce": 2 * block, "logits": logits, "per_step": per_step}


def decode_weight_read_bytes(cfg, tp: int, dtype_bytes: int = 2) -> float:
    """Weight bytes one device reads per decode step at batch 1: its share of every tensor (`device_shapes`),
    except the embedding (one row per token; unless it is the tied LM head) and the routed experts, of which it
    reads k/tp (the top-k spread evenly over the tp ranks: the expectation, not the slowest rank)."""
    total = 0.0
    for name, shape in device_shapes(cfg, tp).items():
        if name == "embed" and not cfg.tie_word_embeddings:
            continue
        if name.endswith(("moe.gate_proj", "moe.up_proj", "moe.down_proj")):
            total += math.prod(shape[1:]) * cfg.num_experts_per_tok / tp * dtype_bytes
        else:
            total += math.prod(shape) * dtype_bytes
    return total


def _longest(cfg, tokens: int) -> str:
    if tokens == 0:
        return "0 (weights do not fit)"
    return f"{tokens:,}" + (" (all positions)" if tokens == cfg.max_position_embeddings else "")


def cp_tp_prefill_table(tokens: int = 131072) -> str:
    lines = [f"Per rank, one prompt of {tokens // 1024}k tokens (B = 1, GDN `sequence`), bf16. Model, not measured.",
             "", "| model | devices | (cp, tp) | weights per device | longest prompt at 141 GiB | ring K/V per attention layer "
             "| GDN maps + halos per GDN layer | tp all-reduces per layer | per prefill (all layers) "
             f"| at {LINK_GBPS:.0f} GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CP_TP_MODELS:
        cfg = PRESETS[name]
        for cp, tp in FACTORIZATIONS:
            w = weights_bytes_per_device(cfg, tp, 2)
            longest = memory_estimate(cfg, cp=cp, tp=tp, budget_bytes=H200_BYTES)["max_prompt_tokens"]
            v = prefill_volumes(cfg, tokens, cp, tp)
            lines.append(f"| {name} | {cp * tp} | ({cp}, {tp}) | {w / 2**30:,.1f} GiB | "
                         f"{_longest(cfg, longest)} | "
                         f"{v['ring_attention'] / MB:,.1f} MB | "
                         f"{v['gdn_sequence'] / MB:,.2f} MB | {v['tp_allreduce'] / MB:,.1f} MB | "
                         f"{v['per_prefill'] / 1e9:,.1f} GB | {v['per_prefill'] / (LINK_GBPS * 1e9) * 1e3:,.0f} ms |")
    return "\n".join(lines)


def cp_tp_decode_table(context: int = 131072) -> str:
    lines = [f"Per rank and decode step, B = 1, context of {context // 1024}k tokens, bf16. Model, not measured.",
             "", "| model | (cp, tp) | weights read per step | KV cache read per step | memory floor at "
             f"{H200_HBM_GBPS / 1000:.1f} TB/s | cp all-gather per attention layer | tp all-reduces per layer "
             "| sent per step | collectives per step |", "|---|---|---|---|---|---|---|---|---|"]
    for name in CP_TP_MODELS:
        cfg = PRESETS[name]
        for cp, tp in FACTORIZATIONS:
            w = decode_weight_read_bytes(cfg, tp)
            kv = kv_bytes_per_token(cfg, cp, 2, tp) * context
            v = decode_volumes(cfg, cp, tp)
            count = len(cfg.attention_layers) * (cp > 1) + (2 * cfg.num_layers + 2) * (tp > 1)
            lines.append(f"| {name} | ({cp}, {tp}) | {w / 1e9:.2f} GB | {kv / 1e9:.3f} GB | "
                         f"{(w + kv) / (H200_HBM_GBPS * 1e9) * 1e3:.2f} ms | {v['attention_partials'] / 1e3:.1f} KB | "
                         f"{v['tp_allreduce'] / 1e3:.1f} KB | {v['per_step'] / 1e6:.2f} MB | {count} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(volume_table())
    print()
    print(time_model())
    print()
    print(cp_tp_prefill_table())
    print()
    print(cp_tp_decode_table())

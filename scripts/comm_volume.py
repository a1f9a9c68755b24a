"""Communication volume per layer and rank of prefill context parallelism, and a paper model of the
prefill time of the 9B shape under cp (docs/communication.md, docs/BENCHMARKS.md).

  python scripts/comm_volume.py            prints both tables (markdown)

Volumes come from `pcp_jax.parallel.gdn_cp.communication_bytes` (bf16 activations, fp32 GDN maps).
The time model is a model, not a measurement: its inputs are the single-H100 kernel figures measured in
docs/BENCHMARKS.md and an assumed NVLink point-to-point bandwidth (stated below).
"""

from __future__ import annotations

from pcp_jax.config import PRESETS
from pcp_jax.parallel.gdn_cp import communication_bytes

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
MATMUL_TFLOPS = 600.0            # assumed achievable share of the 799 TFLOP/s bf16 matmul peak
LINK_GBPS = 300.0                # ASSUMED NVLink point-to-point bandwidth per direction (not measured)


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


if __name__ == "__main__":
    print(volume_table())
    print()
    print(time_model())

"""How far bf16 logits of the random-weight demo model drift from fp32, with the jnp GDN (fp32 inside)
and with our Pallas GDN kernel (bf16 intermediates, like FLA) run through the Pallas interpreter, at
cp = 1, 2 and 4 (the `sequence` GDN strategy for cp > 1: its [v | 0] runs must stay in bf16 and as
accurate as cp = 1). Runs on CPU (4 virtual devices); explains the size of the GPU-vs-jnp difference seen
by `pcp-jax bench --check`.

  python scripts/check_bf16_drift.py [--tokens 1024]
"""

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import pcp_jax.kernels.gdn.reference as gdn_reference  # noqa: E402
from pcp_jax.bench import demo_bf16_reference  # noqa: E402
from pcp_jax.engine import Model  # noqa: E402
from pcp_jax.kernels.gdn import pallas_gpu  # noqa: E402


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    cfg, params, ids, rel = demo_bf16_reference(args.tokens, 1)
    bf16 = lambda cp: rel(Model(cfg, params, cp=cp, dtype="bfloat16", kernels="jnp", gdn_strategy="sequence").logits(ids))
    jnp_err = {cp: bf16(cp) for cp in (1, 2, 4)}
    # Route the model's chunked GDN through the Pallas kernel (interpreted) instead of the jnp reference.
    gdn_reference.chunk_gated_delta_rule = (
        lambda q, k, v, g, b, s=None, scale=None: pallas_gpu.chunk_gated_delta_rule(q, k, v, g, b, s, scale,
                                                                                     interpret=True))
    pallas_err = {cp: bf16(cp) for cp in (1, 2, 4)}
    print(f"demo preset, {args.tokens} tokens, relative error of bf16 logits vs fp32:")
    for cp in (1, 2, 4):
        print(f"  cp={cp}: jnp GDN {jnp_err[cp]:.2e}, Pallas GDN (interpreted) {pallas_err[cp]:.2e}")


if __name__ == "__main__":
    main()

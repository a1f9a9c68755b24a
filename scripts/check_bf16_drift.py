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

import jax  # noqa: E402
import numpy as np

import pcp_jax.kernels.gdn.reference as gdn_reference
from pcp_jax.config import PRESETS
from pcp_jax.engine import Model
from pcp_jax.kernels.gdn import pallas_gpu
from pcp_jax.model import random_params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    cfg = PRESETS["demo"]
    params = {k: np.asarray(v) for k, v in random_params(cfg, seed=1, dtype=jax.numpy.bfloat16).items()}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.tokens))
    with jax.default_matmul_precision("highest"):
        ref = Model(cfg, {k: v.astype(np.float32) for k, v in params.items()}, dtype="float32",
                    kernels="jnp").logits(ids)
    rel = lambda x: float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
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

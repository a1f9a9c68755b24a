"""GPU check of tensor/expert parallelism before any tp timing: on the demo preset (dense) and a MoE variant
of it, random weights rounded to bf16, a random ragged batch:
1. fp32 with the jnp paths (exact-fp32 matmuls): every (cp, tp > 1) over the visible GPUs against cp = tp = 1,
   relative L2 error of the logits <= 1e-5 (the CPU suite's tolerance), and equal greedy tokens;
2. bf16 with the GPU kernels (tokamax grouped matmul on each rank's own experts, flash attention, our GDN
   kernels) at the same (cp, tp): error against the fp32 run within 1e-2 or 1.5x that of the bf16 cp = tp = 1 run.
Prints a table; exit 1 if any row fails.

    python benchmarks/tp_check.py
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from pcp_jax.config import PRESETS
from pcp_jax.engine import Model
from pcp_jax.weights import random_params


def factorizations(n: int) -> list[tuple[int, int]]:
    return [(n // t, t) for t in range(1, n + 1) if n % t == 0]


def main() -> int:
    dense = PRESETS["demo"]
    moe = dataclasses.replace(dense, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                              shared_expert_intermediate_size=256)
    n = len(jax.devices())
    rng = np.random.default_rng(0)
    failed = 0
    print("| model | cp | tp | fp32 rel. err vs (1,1) | greedy equal | bf16 gpu rel. err vs fp32 | limit | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in (("demo", dense), ("demo-moe", moe)):
        params = {k: np.asarray(v) for k, v in random_params(cfg, seed=1, dtype=jax.numpy.bfloat16).items()}
        fp32 = {k: v.astype(np.float32) for k, v in params.items()}
        prompts = [rng.integers(0, cfg.vocab_size, m) for m in (1000, 600)]
        with jax.default_matmul_precision("highest"):
            ref_model = Model(cfg, fp32, dtype="float32", kernels="jnp")
            ref, ref_tok = ref_model.logits(prompts), ref_model.generate(prompts[0][None, :300], 8)
        valid = np.zeros(ref.shape[:2], bool)
        for row, p in enumerate(prompts):
            valid[row, :len(p)] = True
        rel = lambda x: float(np.linalg.norm((x - ref)[valid]) / np.linalg.norm(ref[valid]))
        base = rel(Model(cfg, params, dtype="bfloat16", kernels="gpu").logits(prompts))
        limit = max(1e-2, 1.5 * base)
        for cp, tp in [(c, t) for c, t in factorizations(n) if t > 1]:  # cp alone: checked by bench --check
            with jax.default_matmul_precision("highest"):
                exact = Model(cfg, fp32, cp=cp, tp=tp, dtype="float32", kernels="jnp")
                err32, same = rel(exact.logits(prompts)), bool(np.array_equal(exact.generate(prompts[0][None, :300], 8),
                                                                                 ref_tok))
            del exact
            err16 = rel(Model(cfg, params, cp=cp, tp=tp, dtype="bfloat16", kernels="gpu").logits(prompts))
            ok = err32 <= 1e-5 and same and err16 <= limit
            failed += not ok
            print(f"| {name} | {cp} | {tp} | {err32:.1e} | {same} | {err16:.2e} | {limit:.1e} | {'OK' if ok else 'FAIL'} |",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

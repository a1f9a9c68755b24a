"""`pcp-jax demo`: a small random Qwen3.5 built in-process prefills a long prompt at cp=1 and at cp=C
(virtual CPU devices), checks the two agree, and generates with a progress bar."""

from __future__ import annotations

import os
import time

from pcp_jax.cli.args import int_at_least, set_cpu_devices
from pcp_jax.cli.errors import RunError, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="random small Qwen3.5: long prefill at cp=1 and cp=4, then generation")
    p.add_argument("--tokens", type=int_at_least(1), default=4096, help="prompt length")
    p.add_argument("--new-tokens", type=int_at_least(0), default=32)
    p.add_argument("--cp", type=int_at_least(1), default=4)
    p.set_defaults(run=lambda args: run_demo(args.tokens, args.new_tokens, args.cp))


def run_demo(tokens: int = 4096, new_tokens: int = 32, cp: int = 4) -> int:
    """The demo with `cp` virtual CPU devices (where JAX has not started yet; XLA_FLAGS's count otherwise)."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        set_cpu_devices(cp)
    import jax
    import numpy as np
    from tqdm import tqdm

    from pcp_jax.config import PRESETS
    from pcp_jax.engine import Model, to_host
    from pcp_jax.weights import random_params

    if cp > len(jax.devices()):  # XLA_FLAGS from the environment may have fixed a smaller device count
        raise UsageError(f"--cp={cp} needs {cp} devices but {len(jax.devices())} are visible "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    cfg = PRESETS["demo"]
    print("pcp-jax demo: a RANDOM-WEIGHT Qwen3.5 (demo preset: "
          f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {len(cfg.attention_layers)} full-attention + "
          f"{len(cfg.gdn_layers)} Gated DeltaNet layers). Its output is meaningless text; it shows the machinery.")
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}")
    params = random_params(cfg, seed=0, dtype=np.float32)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, tokens))
    results = {}
    for c in sorted({1, cp}):
        model = Model(cfg, params, cp=c, dtype="float32")
        t0 = time.perf_counter()
        state = model.prefill(prompt, max_new_tokens=new_tokens)
        first = to_host(state.logits)
        t1 = time.perf_counter()
        state = model.prefill(prompt, max_new_tokens=new_tokens)  # compiled: time the prefill itself
        to_host(state.logits)
        t2 = time.perf_counter()
        results[c] = first
        print(f"cp={c}: prefill of {tokens} tokens {t2 - t1:.2f} s (first call with compilation {t1 - t0:.2f} s)")
    if cp != 1:
        err = np.linalg.norm(results[cp] - results[1]) / np.linalg.norm(results[1])
        print(f"cp={cp} vs cp=1 next-token logits: relative difference {err:.2e} "
              f"({'agree' if err < 1e-4 else 'DISAGREE'})")
    model = Model(cfg, params, cp=cp, dtype="float32")
    bar = tqdm(total=new_tokens, desc=f"generating (cp={cp})", unit="tok")
    t0 = time.perf_counter()
    out = model.generate(prompt, new_tokens, callback=lambda step, tok: bar.update(1))
    bar.close()
    print(f"generated {new_tokens} tokens in {time.perf_counter() - t0:.2f} s: {out[0, tokens:].tolist()}")
    print("Real weights: `pcp-jax convert HF_DIR OUT_DIR`, then "
          "`pcp-jax generate --model OUT_DIR --prompt 'Hello' --cp N` (or pcp_jax.load_model(path, cp=N)).")
    if cp != 1 and not err < 1e-4:
        raise RunError(f"cp={cp} and cp=1 disagree: relative difference of the next-token logits {err:.2e} "
                       f"(expected < 1e-4)")
    return 0

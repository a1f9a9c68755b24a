"""Choosing the next token: the settings' checks on the host and the sampling math on the device.

`Settings.of(temperature, top_k, top_p, seed, vocab)` checks what a user passed, once, on the host, and holds
what the device program uses (pcp_jax.programs.Sample): the values are used in float32 there, so they are
checked and defined for float32. A temperature too small for float32 (below its smallest normal number,
about 1.2e-38, zero included) samples greedily, as its limit does; every top_p in (0, 1] keeps at least the
most likely token. `sample` is the device math, `eos_set` the stop tokens.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax.inputs import is_int

FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Checked sampling settings. `greedy`: argmax (temperature 0 or below float32's range); else
    `temperature` > 0, `top_k` in 1..vocab (vocab: no limit), `top_p` in (0, 1]."""
    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int

    @classmethod
    def of(cls, temperature, top_k, top_p, seed, vocab: int) -> "Settings":
        """Each error names the value and what is expected."""
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
        if top_k is not None and not (is_int(top_k) and 1 <= top_k <= vocab):
            raise ValueError(f"top_k={top_k!r} must be an integer in 1..{vocab} (the vocabulary size)")
        if top_p is not None and not (_is_real(top_p) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p={top_p!r} must be a number in (0, 1]")
        if not (is_int(seed) and 0 <= seed < 2**32):
            raise ValueError(f"seed={seed!r} must be an integer in 0..2**32-1")
        greedy = float(np.float32(temperature)) < FLOAT32_TINY
        return cls(greedy, float(temperature), vocab if top_k is None else int(top_k),
                   1.0 if top_p is None else float(top_p), int(seed))


def eos_set(eos, vocab: int) -> frozenset[int]:
    """EOS ids as a set: None, one id, or a sequence of ids, each in [0, vocab)."""
    if eos is None:
        return frozenset()
    items = [eos] if is_int(eos) else eos
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple, set, frozenset, np.ndarray)):
        raise ValueError(f"eos_token_id={eos!r} must be a token id or a list of token ids")
    out = set()
    for e in items:
        if not (is_int(e) and 0 <= e < vocab):
            raise ValueError(f"eos_token_id={eos!r}: {e!r} is not a token id in [0, {vocab})")
        out.add(int(e))
    return frozenset(out)


def sample(logits, key, step, temperature, top_k, top_p, *, greedy: bool):
    """Next tokens [B] int32 from logits [B, V] fp32: argmax when greedy, else sampling at `temperature`
    within the `top_k` most likely tokens and the smallest set whose mass reaches `top_p` (never empty: the
    most likely token is always kept). The logits are shifted by their maximum before the division, so any
    temperature >= float32's smallest normal stays finite (tiny ones give the argmax). Every setting is
    traced, so one program serves every temperature, top_k and top_p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / jnp.maximum(temperature, FLOAT32_TINY)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jax.lax.dynamic_index_in_dim(sorted_logits, top_k - 1, axis=1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # smallest set whose mass reaches top_p
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1).astype(jnp.int32)

"""What the engine takes from its callers, checked: `as_batch(input_ids, vocab)` a batch of token ids (a
[B, N] integer array or a list of prompts of different lengths, each a 1-D sequence of ids), padded;
`check_new_tokens(n)` and `check_warmup(...)` the
number of new tokens and warmup's arguments. Every error is a ValueError naming the value at fault.
"""

from __future__ import annotations

import numbers

import numpy as np


def is_int(v) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_new_tokens(max_new_tokens) -> None:
    """max_new_tokens of prefill, generate, decode and warmup: a non-negative integer."""
    if not (is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")


def check_warmup(max_tokens, max_new_tokens, batch_sizes, workers) -> list[int]:
    """The batch sizes of `Model.warmup`, sorted and distinct, once every argument is checked."""
    if not (is_int(max_tokens) and max_tokens >= 1):
        raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer")
    check_new_tokens(max_new_tokens)
    sizes = [] if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__") else list(batch_sizes)
    if not sizes or not all(is_int(b) and b >= 1 for b in sizes):
        raise ValueError(f"batch_sizes={batch_sizes!r} must be a sequence of positive integers")
    if workers is not None and not (is_int(workers) and workers >= 1):
        raise ValueError(f"workers={workers!r} must be a positive integer or None")
    return sorted(set(int(b) for b in sizes))


def as_batch(input_ids, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, N] int32 right-padded with 0, lengths [B] int32); ValueError for an empty batch or prompt, ids
    that are not integers or lie outside [0, vocab), or a shape that is not [batch, tokens]."""
    if isinstance(input_ids, (list, tuple)) and len(input_ids) == 0:
        raise ValueError("input_ids is empty: pass at least one prompt")
    if isinstance(input_ids, (list, tuple)) and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        rows = [np.asarray(r) for r in input_ids]
    else:
        arr = np.asarray(input_ids)
        if arr.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, tokens]; got shape {arr.shape}")
        rows = list(arr)
    if not rows:
        raise ValueError("input_ids is empty: pass at least one prompt")
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise ValueError(f"prompt {i} must be a 1-D sequence of token ids; got shape {r.shape}")
        if r.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"token ids must be integers; prompt {i} has dtype {r.dtype}")
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id {lo if lo < 0 else hi} in prompt {i} is out of range [0, {vocab})")
    lengths = np.array([r.size for r in rows], np.int32)
    ids = np.zeros((len(rows), lengths.max()), np.int32)
    for i, r in enumerate(rows):
        ids[i, : r.size] = r
    return ids, lengths

"""`attention_block` on Hopper through tokamax's Mosaic GPU flash attention (`PallasMosaicGpuFlashAttention`).

Contract: reference.attention_block. q [B, Tq, Hq, D], k, v [B, Tk, Hkv, D] (bf16 or fp16; GQA handled
by the kernel, K/V never repeated), q_pos [B, Tq], k_pos [B, Tk] int32 global positions (k_pos < 0: empty
slot). Returns out [B, Tq, Hq, D] fp32 (0 for rows that see no key) and lse [B, Hq, Tq] fp32 (-inf there).
lse = m + log(l) from tokamax's residuals (row max m in natural-log units, scale included; row sum l).

How the positions reach the kernel. Passing them as `q_indices`/`k_indices` makes tokamax build a dense
[Tq, Tk] mask that the kernel streams and applies to every block: a causal diagonal step then costs a
full unmasked step (measured 284 vs 556 TFLOP/s at 8k). So the wrapper describes the visible set in the
cheapest exact form the data allows, chosen at run time by `lax.switch` (every branch is compiled, one
runs; the predicates cost O(T log T) integer work):
  "plain"  : every key visible to every row (non-causal and no empty slot, or causal with every key at or
             before every query). No mask.
  "causal" : q and k hold the same contiguous run of positions (the diagonal ring step): plain
             `is_causal`, which skips the blocks above the diagonal.
  "range"  : the valid keys are one contiguous index run in ascending position order: per-row
             [k_start, k_end) ranges, which the kernel turns into block skipping plus an edge mask.
  "dense"  : anything else: a [B, 1, Tq, Tk] boolean mask (correct for any positions, slowest).
  "empty"  : causal and every valid key after every query: zeros and -inf, no kernel.
fp32 inputs raise NotImplementedError: the kernel's dots take 16-bit operands, so fp32 accuracy would be
silently lost (api.py falls back to the reference for kernels="auto").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

PATHS = ("plain", "causal", "range", "dense", "empty")
_BIG = jnp.iinfo(jnp.int32).max


@functools.cache
def _flash():
    # Imported lazily: tokamax (and Mosaic GPU) exist only on GPU installs.
    from tokamax._src.ops.attention import base as tk_base
    from tokamax._src.ops.attention.pallas_mosaic_gpu import PallasMosaicGpuFlashAttention

    return PallasMosaicGpuFlashAttention(), tk_base.Mask


def check_supported(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.bfloat16, jnp.float16):
            raise NotImplementedError(
                f"tokamax attention: {name}.dtype={x.dtype}; the Mosaic GPU kernel takes bf16/fp16 operands")
    if q.shape[2] % k.shape[2]:
        raise NotImplementedError(f"tokamax attention: Hq={q.shape[2]} not a multiple of Hkv={k.shape[2]}")
    if q.shape[-1] != v.shape[-1]:
        raise NotImplementedError(f"tokamax attention: q head dim {q.shape[-1]} != v head dim {v.shape[-1]}")


def _key_ranges(q_pos, k_pos, causal):
    """Per-row [k_start, k_end) describing the visible keys, and whether that description is exact.
    Exact iff the valid keys (k_pos >= 0) form one contiguous index run with non-decreasing positions."""
    Tk = k_pos.shape[1]
    valid = k_pos >= 0
    n_valid = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
    first = jnp.argmax(valid, axis=1).astype(jnp.int32)  # 0 when none valid (then n_valid = 0)
    idx = jnp.arange(Tk, dtype=jnp.int32)[None]
    contiguous = jnp.all(valid == ((idx >= first[:, None]) & (idx < (first + n_valid)[:, None])), axis=1)
    both = valid[:, 1:] & valid[:, :-1]
    ascending = jnp.all(jnp.where(both, k_pos[:, 1:] >= k_pos[:, :-1], True), axis=1)
    if causal:
        keys = jnp.sort(jnp.where(valid, k_pos, _BIG), axis=1)
        count = jax.vmap(lambda kk, qq: jnp.searchsorted(kk, qq, side="right"))(keys, q_pos)
        count = jnp.minimum(count.astype(jnp.int32), n_valid[:, None])
        exact = contiguous & ascending
    else:
        count = jnp.broadcast_to(n_valid[:, None], q_pos.shape)
        exact = contiguous
    k_start = jnp.broadcast_to(first[:, None], q_pos.shape)
    return k_start, first[:, None] + count, jnp.all(exact)


def _choose_path(q_pos, k_pos, causal, range_exact):
    """Index into PATHS of the cheapest exact path for these positions (a traced int32)."""
    Tq, Tk = q_pos.shape[1], k_pos.shape[1]
    valid = k_pos >= 0
    all_valid = jnp.all(valid)
    if not causal:
        return jnp.where(all_valid, 0, jnp.where(range_exact, 2, 3)).astype(jnp.int32)
    k_max = jnp.max(jnp.where(valid, k_pos, -1), axis=1)
    k_min = jnp.min(jnp.where(valid, k_pos, _BIG), axis=1)
    q_min, q_max = jnp.min(q_pos, axis=1), jnp.max(q_pos, axis=1)
    all_before = all_valid & jnp.all(k_max <= q_min)
    all_after = jnp.all(k_min > q_max)  # also true when no key is valid
    diagonal = jnp.bool_(False)
    if Tq == Tk:
        run = k_pos[:, :1] + jnp.arange(Tk, dtype=k_pos.dtype)[None]
        diagonal = all_valid & jnp.all(k_pos == run) & jnp.all(q_pos == k_pos)
    return jnp.select([all_after, all_before, diagonal, range_exact], [4, 0, 1, 2], 3).astype(jnp.int32)


def attention_block(q, k, v, q_pos, k_pos, *, scale=None, causal=True, path: str = "auto"):
    """See module docstring. `path` forces one of PATHS (benchmarks, and callers that know the layout:
    api.attention_block's `visible`); "auto" picks at run time."""
    check_supported(q, k, v)
    flash, Mask = _flash()
    B, Tq, Hq, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    q_pos = q_pos.astype(jnp.int32)
    k_pos = k_pos.astype(jnp.int32)
    # The per-row ranges (a sort and a search per row) are needed only by the range path and the chooser.
    ranges = _key_ranges(q_pos, k_pos, causal) if path in ("auto", "range") else None
    call = functools.partial(flash, q, k, v, logits_scale=scale, return_residuals=True)

    def finish(out, res):
        m, l = res  # [B, Hq, Tq] each
        seen = l > 0
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        out = jnp.where(jnp.swapaxes(seen, 1, 2)[..., None], out.astype(jnp.float32), 0.0)
        return out, lse.astype(jnp.float32)

    def plain():
        return finish(*call())

    def diagonal():
        return finish(*call(is_causal=True))

    def ranged():
        # k_start/k_end broadcast over heads: [B, 1, Tq]. A row that sees no key gets an empty range.
        k_start, k_end, _ = ranges
        return finish(*call(mask=Mask(k_start=k_start[:, None], k_end=k_end[:, None])))

    def dense():
        visible = (k_pos >= 0)[:, None, :]
        if causal:
            visible = visible & (k_pos[:, None, :] <= q_pos[:, :, None])
        else:
            visible = jnp.broadcast_to(visible, (B, Tq, k_pos.shape[1]))
        return finish(*call(mask=visible[:, None]))

    def empty():
        return jnp.zeros((B, Tq, Hq, v.shape[-1]), jnp.float32), jnp.full((B, Hq, Tq), -jnp.inf, jnp.float32)

    branches = dict(plain=plain, causal=diagonal, range=ranged, dense=dense, empty=empty)
    if path != "auto":
        if path not in branches:
            raise ValueError(f"path={path!r}; expected 'auto' or one of {list(PATHS)}")
        return branches[path]()
    index = _choose_path(q_pos, k_pos, causal, ranges[2])
    return lax.switch(index, [branches[p] for p in PATHS])

"""Decode attention that reads the stacked KV cache in place: a Pallas kernel (Triton lowering) for GPUs.

Why: the caches of all attention layers are one array per K and V, [N, B, S, Hkv, D] (model.empty_caches).
The jnp paths slice layer i out of it, and the profile of a 9B step at 32k context on an H200 shows 64
device-to-device copies per step (0.69 ms of 6.5 ms): two per layer, most likely these slices (K and V of
the attention layers, state and conv of the GDN layers; inferred from the count, docs/gpu_notes.md). The
jnp paths also read all S slots of the capacity, filled or not. This kernel takes the whole stacked array
and the layer index as a run-time scalar and loads only that layer's blocks, and only the blocks below
`used` (slots at or past `used` are empty on every row: decode fills slots in order). Not yet timed on a
GPU: `Model(decode_attention="pallas")` is opt-in.

Contract: as reference.attention_block for one query row, causal (keys visible where 0 <= k_pos <= q_pos):
  q [B, 1, Hq, D]; k_stack, v_stack [N, B, S, Hkv, D]; layer int scalar (traced or static); q_pos [B, 1],
  k_pos [B, S] int32; used: int scalar, slots >= used are empty (default S).
  Returns (out [B, 1, Hq, D] fp32, lse [B, Hq, 1] fp32; 0 / -inf where a row sees no key).
`reference` below is the same function in jnp (slice + reference.attention_block).

How the work is cut: programs (b, kv head, split); each walks its split's `block`-slot blocks up to `used`
with an online softmax, for the G = Hq / Hkv query heads of its kv head at once (padded to 16 rows for the
matrix units), and writes a partial (out, lse); the partials are merged by log-sum-exp (`merge_stacked`, the
merge of the split-K jnp path and of the cp ranks). Splits are chosen so that about SPLIT_PROGRAMS programs
run. bf16 caches: bf16 dot operands, fp32 accumulation and softmax; fp32 caches: exact fp32 dots.

Limits (NotImplementedError; kernels/attention/api.py then slices and runs the jnp path): D a power of two
>= 16, S a multiple of 16, one query row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import NEG_INF, attention_block, merge_stacked

f32 = jnp.float32
SPLIT_PROGRAMS = 256  # about two programs per SM of an H100/H200
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")


def reference(q, k_stack, v_stack, layer, q_pos, k_pos, *, used=None, scale=None):
    """The contract in jnp: the layer's slice, then one softmax over its slots (`used` changes nothing:
    slots past it are empty by the caller's promise)."""
    k = lax.dynamic_index_in_dim(k_stack, layer, 0, keepdims=False)
    v = lax.dynamic_index_in_dim(v_stack, layer, 0, keepdims=False)
    return attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=True)


def block_slots(S: int) -> int:
    """Slots per block: the largest of 64, 32, 16 dividing S."""
    for b in (64, 32, 16):
        if S % b == 0:
            return b
    raise NotImplementedError(f"pallas decode attention: {S} cache slots, not a multiple of 16")


def check_supported(q, k_stack) -> None:
    D = q.shape[-1]
    if q.shape[1] != 1:
        raise NotImplementedError(f"pallas decode attention: {q.shape[1]} query rows; one per sequence")
    if D < 16 or D & (D - 1):
        raise NotImplementedError(f"pallas decode attention: head dim {D}; a power of two >= 16")
    block_slots(k_stack.shape[2])


def _kernel(meta_ref, qpos_ref, q_ref, kpos_ref, k_ref, v_ref, o_ref, lse_ref, *, block, blocks_per_split,
            scale, prec):
    """Refs: meta [2] = (layer, used); qpos [B]; q [Gp, D] (this row and kv head); kpos [B, S]; k, v the
    whole stacked caches [N, B, S, Hkv, D]; out o [Gp, D] and lse [Gp] of this (row, kv head, split)."""
    b, h, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, used = meta_ref[0], meta_ref[1]
    q = q_ref[...]
    qpos = qpos_ref[b]
    lo = p * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, (used + block - 1) // block)

    def body(i, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(i * block, block)
        k = k_ref[layer, b, pl.ds(s0, block), h, :]
        v = v_ref[layer, b, pl.ds(s0, block), h, :]
        kpos = kpos_ref[b, pl.ds(s0, block)]
        visible = ((kpos >= 0) & (kpos <= qpos))[None, :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32, precision=prec)
        s = jnp.where(visible, s * scale, NEG_INF)  # [Gp, block]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)  # 0 while nothing was seen (m = -inf)
        pr = jnp.where(visible, jnp.exp(s - m_safe[:, None]), 0.0)
        acc = acc * alpha[:, None] + jnp.dot(pr.astype(v.dtype), v, preferred_element_type=f32, precision=prec)
        return m_new, l * alpha + jnp.sum(pr, axis=1), acc

    Gp, D = q.shape
    init = (jnp.full((Gp,), NEG_INF, f32), jnp.zeros((Gp,), f32), jnp.zeros((Gp, D), f32))
    m, l, acc = lax.fori_loop(lo, hi, body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), NEG_INF)


def stacked_decode_attention(q, k_stack, v_stack, layer, q_pos, k_pos, *, used=None, scale=None,
                             splits: int | None = None, interpret: bool = False):
    """The module's contract. `splits`: cache splits per (row, kv head), default about SPLIT_PROGRAMS
    programs in all; `interpret=True` runs the kernel through the Pallas interpreter (CPU tests)."""
    check_supported(q, k_stack)
    B, _, Hq, D = q.shape
    N, _, S, Hkv, _ = k_stack.shape
    G = Hq // Hkv
    Gp = max(16, 1 << (G - 1).bit_length())
    block = block_slots(S)
    n_blocks = S // block
    splits = splits or max(1, min(n_blocks, -(-SPLIT_PROGRAMS // (B * Hkv))))
    blocks_per_split = -(-n_blocks // splits)
    splits = -(-n_blocks // blocks_per_split)  # no split left without blocks
    scale = D**-0.5 if scale is None else float(scale)
    exact = k_stack.dtype == f32
    prec = lax.Precision.HIGHEST if exact else lax.Precision.DEFAULT
    qg = q.reshape(B, Hkv, G, D).astype(k_stack.dtype)
    if Gp != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    used = S if used is None else used
    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(used, jnp.int32)])
    whole = pl.BlockSpec()  # the full array: the kernel indexes it with run-time scalars
    o, lse = pl.pallas_call(
        functools.partial(_kernel, block=block, blocks_per_split=blocks_per_split, scale=scale, prec=prec),
        grid=(B, Hkv, splits),
        in_specs=[whole, whole, pl.BlockSpec((None, None, Gp, D), lambda b, h, p: (b, h, 0, 0)),
                  whole, whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, Gp, D), lambda b, h, p: (p, b, h, 0, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, p: (p, b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((splits, B, Hkv, Gp, D), f32),
                   jax.ShapeDtypeStruct((splits, B, Hkv, Gp), f32)],
        compiler_params=_CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention_stacked",
    )(meta, q_pos.reshape(B).astype(jnp.int32), qg, k_pos.astype(jnp.int32), k_stack, v_stack)
    outs = o[:, :, :, :G].reshape(splits, B, 1, Hq, D)
    lses = lse[:, :, :, :G].reshape(splits, B, Hq, 1)
    return merge_stacked(outs, lses)

"""Public block-attention op (one ring step, or one KV shard in decode). Contract: reference.py.

On a GPU backend (see backend.use_gpu_kernels) it runs tokamax's Mosaic GPU flash attention
(tokamax_gpu.py) where it takes the inputs (bf16/fp16), else the jnp reference (backend.first_that_runs).
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from ..backend import first_that_runs, use_gpu_kernels
from . import decode, reference
from .reference import merge_partials, merge_stacked  # noqa: F401  (part of the public surface)


VISIBLE = ("auto", "diagonal", "all")


# Each op is its own jitted function: a program that calls it several times with the same shapes (the ring's
# steps, every layer of an unrolled decode with the layer index traced) traces and lowers its kernel once.
@functools.partial(jax.jit, static_argnames=("scale", "causal", "kernels", "visible"))
def attention_block(q, k, v, q_pos, k_pos, *, scale=None, causal=True, kernels="auto", visible="auto"):
    """Returns (out [B, Tq, Hq, D] fp32, lse [B, Hq, Tq] fp32).

    `visible` is a promise by the caller about the positions, which lets a GPU backend compile one mask
    form instead of choosing among several at run time (each choice is a compiled kernel):
      "diagonal": causal, q_pos == k_pos, one contiguous ascending run, no empty slot (a ring's diagonal);
      "all":      every key visible to every query (no empty slot, and not causal or all keys earlier);
      "auto":     no promise; the backend inspects the positions.
    The result is the same either way when the promise holds (the jnp path always masks by position);
    tests/test_ring_attention.py checks the ring's promises against the run-time chooser."""
    if visible not in VISIBLE:
        raise ValueError(f"visible={visible!r}; expected one of {VISIBLE}")
    implementations = []
    if use_gpu_kernels(kernels):
        from . import tokamax_gpu

        path = {"auto": "auto", "diagonal": "causal", "all": "plain"}[visible]
        implementations = [("tokamax flash attention", lambda: tokamax_gpu.attention_block(
            q, k, v, q_pos, k_pos, scale=scale, causal=causal, path=path))]
    return first_that_runs("attention", kernels, implementations,
                           lambda: reference.attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=causal))


DECODE_METHODS = ("dense", "split", "split-sum", "pallas")


def decode_attention(q, k, v, q_pos, k_pos, *, method="dense", block=None, scale=None):
    """Attention of one decode step's queries to a KV cache shard, jnp on every backend (one query row
    per sequence is memory-bound; a flash kernel's 64-row query tiles would be almost empty).
    Contract and returns: those of `attention_block` (causal).
      "dense":     one softmax over all S slots (reference.attention_block);
      "split":     split along the cache in blocks of `block` slots (default decode.split_block(S)),
                   partials merged by log-sum-exp, products as einsums (decode.py);
      "split-sum": the same split, products as multiply + sum reductions (decode.py).
    ("pallas" reads the stacked caches in place: `decode_attention_stacked`.)"""
    if method == "pallas":
        raise ValueError("method='pallas' reads the stacked caches: call decode_attention_stacked")
    if method not in DECODE_METHODS:
        raise ValueError(f"method={method!r}; expected one of {DECODE_METHODS}")
    if method == "dense":
        return reference.attention_block(q, k, v, q_pos, k_pos, scale=scale, causal=True)
    block = decode.split_block(k.shape[1]) if block is None else block
    return decode.split_attention(q, k, v, q_pos, k_pos, block=block, scale=scale, causal=True,
                                  form="dot" if method == "split" else "sum")


@functools.partial(jax.jit, static_argnames=("method", "scale"))
def decode_attention_stacked(q, k_stack, v_stack, layer, q_pos, k_pos, *, used, method="dense", scale=None):
    """`decode_attention` on layer `layer` of the stacked caches k_stack, v_stack [N, B, S, Hkv, D]; slots at
    or past `used` (a scalar) are empty on every row. "pallas": decode_pallas.py's kernel, which reads the
    layer's filled blocks in place (on a backend without GPU kernels through the Pallas interpreter, for
    tests; unsupported shapes slice and run "dense"); the other methods slice the layer out first (XLA
    copies it) and run `decode_attention`."""
    def sliced(how):
        k, v = (lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in (k_stack, v_stack))
        return decode_attention(q, k, v, q_pos, k_pos, method=how, scale=scale)

    if method != "pallas":
        return sliced(method)
    from . import decode_pallas

    in_place = lambda: decode_pallas.stacked_decode_attention(q, k_stack, v_stack, layer, q_pos, k_pos, used=used,
                                                               scale=scale, interpret=not use_gpu_kernels("auto"))
    return first_that_runs("decode attention", "auto", [("the Pallas kernel reading the cache in place", in_place)],
                           lambda: sliced("dense"))

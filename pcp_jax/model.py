"""Qwen3.5 text model in Flax NNX, written per shard of the `cp` and `tp` mesh axes.

Reads top-down in the order data flows: norms and RoPE, the two token mixers (gated full attention,
Gated DeltaNet), the two channel mixers (MLP, MoE), the decoder layer, the model. Parameters are
`nnx.Param`s whose dotted paths are the flat names of the checkpoint contract (docs/convert.md), e.g.
`layers.3.attn.q_proj`; every matrix is input-major (y = x @ W).

Layers run as a `lax.scan` over groups of one period of `layer_types` (3 GDN + 1 attention for Qwen3.5),
with weights stacked over the groups at load; layers after the last whole group run unrolled
(`LayerPlan`). Caches are stacked by layer kind (`empty_caches`): every attention layer's KV slots in one
[n_attention, B, S, Hkv, hd] pair, every GDN layer's conv and recurrent state in one array each; a layer
reads and writes its own index of them in place.

Under tensor parallelism (`tp` > 1) each shard holds its heads, intermediate columns, experts and vocabulary
rows (pcp_jax/parallel/tensor.py) and its modules are built with `local_config`: the code below is the unsplit
code with smaller counts. Token mixers, MLP and MoE return partial sums; the decoder layer reduces each
block's output over `tp` once (`ShardContext.tp_sum`).

Two entry points per module, both per shard and both inside one `shard_map`:
- `prefill(x, ctx, caches, index, history)`: x [B, T, D] are this rank's tokens (zigzag order under cp); returns the
  output and the layer's cache entry (its K/V shard, or its GDN conv + recurrent state);
- `decode(x, ctx, caches, index, ...)`: x [B, 1, D], the same token on every rank; attention reads the local
  KV shard and merges partials across `cp`; GDN state is replicated over `cp`.
Numerics (DESIGN.md §2): zero-centred RMSNorm in fp32, softmax/router/GDN gates and state in fp32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pcp_jax.config import FULL_ATTENTION, ModelConfig
from pcp_jax.fp8 import Fp8Matrix, Fp8Param, linear
from pcp_jax.kernels import gated_delta_rule_step, grouped_matmul, grouped_swiglu, merge_partials, merge_stacked
from pcp_jax.kernels.attention.api import decode_attention_stacked
from pcp_jax.parallel.context import ShardContext
from pcp_jax.parallel.expert_dispatch import combine_experts, sort_by_expert
from pcp_jax.parallel.gdn_cp import causal_conv, gdn_batch, gdn_sequence, split_heads
from pcp_jax.parallel.ring_attention import ring_attention, ring_over_cache
from pcp_jax.parallel.tensor import local_config
# Random weights live beside their declaration (pcp_jax.weights); launch.py, bench.py and demo.py still import
# them from here until they import pcp_jax.weights (issue 26).


@dataclasses.dataclass(frozen=True)
class History:
    """Where a prefill piece sits in the KV slots: `offset` (traced) is the first slot it writes;
    `blocks` (traced, or None for a first piece) counts the blocks of earlier pieces to attend to;
    `kpos` [B, S] are the positions held by the slots before this piece."""
    offset: jax.Array
    blocks: jax.Array | None
    kpos: jax.Array


# Norms and RoPE ------------------------------------------------------------------------------------
def rms_norm(x, w, eps, zero_centred=True):
    """x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32 (or * w when not zero-centred); returns x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    wf = w.astype(jnp.float32)
    return (y * ((1.0 + wf) if zero_centred else wf)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [rotary_dim / 2] float32, scale of cos and sin) of `cfg`'s RoPE, computed as
    transformers computes them in float32 (`compute_default_rope_parameters`, `_compute_yarn_parameters`).
    YaRN keeps the original frequencies of the dims that turn more than `beta_fast` times over the pretrained
    positions, divides by `factor` those that turn fewer than `beta_slow` times, and blends linearly between."""
    rot = cfg.rotary_dim
    pos_freqs = cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float32) / rot)
    if cfg.rope_type == "default":
        return 1.0 / pos_freqs, 1.0

    def correction_dim(rotations):  # the rotary dim whose wavelength fits `rotations` times in the positions
        return rot * math.log(cfg.rope_original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(rot // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    inv_freq = 1.0 / (cfg.rope_factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    return inv_freq.astype(np.float32), float(cfg.rope_attention_factor)


def rope(x, positions, cfg: ModelConfig):
    """Partial rotary embedding on the first `rotary_dim` dims (rotate_half form), with the frequencies and
    cos/sin scale of `rope_frequencies`. x [B, T, H, hd]; positions [B, T]. Text-only M-RoPE equals this 1-D
    RoPE."""
    rot = cfg.rotary_dim
    inv_freq, scale = rope_frequencies(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, rot]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    return jnp.concatenate([xr * cos + rotated * sin, xp], axis=-1)


# flax >= 0.12 wants lists of modules wrapped in nnx.List; older releases take a plain list.
_ModuleList = getattr(nnx, "List", list)


def _param(params: dict, name: str, dtype):
    """The device parameter `name` as module state: an nnx.Param in `dtype`, or an FP8 weight (Fp8Matrix, which
    `linear` multiplies by)."""
    if name not in params:
        raise ValueError(f"missing parameter {name!r}")
    if isinstance(params[name], Fp8Param):
        return Fp8Matrix(params[name])
    return nnx.Param(jnp.asarray(params[name], dtype=dtype))


# Token mixers --------------------------------------------------------------------------------------
class GatedAttention(nnx.Module):
    """Full attention with a per-head output gate: q_proj emits [query | gate] per head."""

    def __init__(self, cfg: ModelConfig, params: dict, prefix: str, dtype):
        self.cfg = cfg
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            setattr(self, n, _param(params, f"{prefix}.{n}", dtype))

    def _qkv(self, x, positions):
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_dim
        qg = linear(x, self.q_proj).reshape(B, T, cfg.num_heads, 2 * hd)
        q, gate = qg[..., :hd], qg[..., hd:].reshape(B, T, cfg.num_heads * hd)
        q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
        k = rms_norm(linear(x, self.k_proj).reshape(B, T, cfg.num_kv_heads, hd), self.k_norm[...], cfg.rms_norm_eps)
        v = linear(x, self.v_proj).reshape(B, T, cfg.num_kv_heads, hd)
        return rope(q, positions, cfg), rope(k, positions, cfg), v, gate

    def _out(self, attn, gate, x):
        B, T = x.shape[:2]
        y = attn.astype(x.dtype).reshape(B, T, -1) * jax.nn.sigmoid(gate)
        return linear(y, self.o_proj)

    def prefill(self, x, ctx: ShardContext, caches, index, history):
        """caches["k"/"v"] [NA, B, S, Hkv, hd]: this rank's slots of every attention layer; this layer's
        are `index` (traced under the layer scan). The piece's K/V are written at slot `history.offset`.
        history.blocks (None on a first piece) counts the filled blocks of earlier pieces, which the
        queries also attend to (they travel to every rank's cache shard)."""
        q, k, v, gate = self._qkv(x, ctx.positions)
        # Write first, then read only the blocks of earlier pieces: a read of the old buffer after the
        # write would make XLA copy the whole cache instead of updating it in place.
        write = lambda buf, a: jax.lax.dynamic_update_slice(buf, a[None].astype(buf.dtype),
                                                             (index, 0, history.offset, 0, 0))
        caches = dict(caches, k=write(caches["k"], k), v=write(caches["v"], v))
        out, lse = ring_attention(q, k, v, ctx)
        if history.blocks is not None:
            out, lse = merge_partials(out, lse, *ring_over_cache(q, caches["k"], caches["v"], index, history.kpos,
                                                                 ctx, history.blocks))
        return self._out(out, gate, x), caches

    def decode(self, x, ctx: ShardContext, caches, index, kpos, write, attention="dense"):
        """One token. caches["k"/"v"] [NA, B, S, Hkv, hd] this rank's slots (this layer's: `index`); kpos
        [B, S] their positions (-1 empty, already including the new token); write = (owner rank, slot)
        of the new token; `attention`: the method of kernels.attention.api.decode_attention_stacked."""
        q, k, v, gate = self._qkv(x, ctx.positions)
        caches = dict(caches, k=write_slot(caches["k"], k, ctx, write, index),
                      v=write_slot(caches["v"], v, ctx, write, index))
        out, lse = decode_attention_stacked(q, caches["k"], caches["v"], index, ctx.positions, kpos,
                                            used=write[1] + 1, method=attention)  # slots past `write` are empty
        if ctx.cp > 1:  # one collective: gather every rank's partial, merge locally
            out, _ = merge_stacked(ctx.all_gather(out), ctx.all_gather(lse))
        return self._out(out, gate, x), caches


def write_slot(buf, new, ctx: ShardContext, write, index=None):
    """Put `new` [B, 1, ...] into slot `write[1]` of buf [B, S, ...] (or of buf[index] when buf is stacked
    [N, B, S, ...]) on rank `write[0]` only, in place."""
    owner, slot = write
    if index is None:
        old = jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(ctx.rank == owner, new.astype(buf.dtype), old),
                                                   slot, axis=1)
    start = (index, 0, slot) + (0,) * (buf.ndim - 3)
    old = jax.lax.dynamic_slice(buf, start, (1,) + new.shape)
    return jax.lax.dynamic_update_slice(buf, jnp.where(ctx.rank == owner, new[None].astype(buf.dtype), old), start)


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet token mixer: conv1d + SiLU over [q|k|v], delta-rule recurrence, gated RMSNorm."""

    def __init__(self, cfg: ModelConfig, params: dict, prefix: str, dtype):
        self.cfg = cfg
        for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv_weight", "A_log", "dt_bias",
                  "norm", "out_proj"):
            setattr(self, n, _param(params, f"{prefix}.{n}", dtype))

    def _gates(self, x):
        """beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias); both [B, T, Hv] fp32."""
        b = (x @ self.in_proj_b[...]).astype(jnp.float32)
        a = (x @ self.in_proj_a[...]).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a + self.dt_bias[...].astype(jnp.float32))
        return g, jax.nn.sigmoid(b)

    def _out(self, o, x):
        cfg = self.cfg
        B, T = x.shape[:2]
        z = linear(x, self.in_proj_z).reshape(B, T, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
        y = rms_norm(o.astype(x.dtype), self.norm[...], cfg.rms_norm_eps, zero_centred=False)
        y = (y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
        return linear(y.reshape(B, T, -1), self.out_proj)

    def prefill(self, x, ctx: ShardContext, caches, index, history):
        """caches["conv"] [NG, B, K-1, conv_dim], caches["state"] [NG, B, Hv, dk, dv] fp32: every GDN
        layer's state carried into this piece; this layer's is `index`. Returns it updated. With
        `ctx.capture` [P] positions, also the states at those positions, in caches["capture_conv"]
        [NG, P, B, K-1, conv_dim] and caches["capture_state"] [NG, P, B, Hv, dk, dv] (what a prefix cache keeps
        to resume there)."""
        cfg = self.cfg
        conv0 = jax.lax.dynamic_index_in_dim(caches["conv"], index, 0, keepdims=False)
        state0 = jax.lax.dynamic_index_in_dim(caches["state"], index, 0, keepdims=False)
        qkv = linear(x, self.in_proj_qkv)
        g, beta = self._gates(x)
        valid = ctx.valid[..., None]
        g, beta = jnp.where(valid, g, 0.0), jnp.where(valid, beta, 0.0)  # padding never enters a state
        run = gdn_batch if ctx.gdn_strategy == "batch" else gdn_sequence
        o, state, captured = run(qkv, g, beta, self.conv_weight[...], ctx, cfg, conv0, state0)
        start = ctx.pmin(jnp.min(ctx.positions, axis=1))  # [B] first position of this piece
        conv = _tokens_before(qkv, ctx, conv0, start + ctx.psum(jnp.sum(ctx.valid, axis=1)))
        caches = _put_gdn(caches, index, conv, state)
        if captured is not None:
            windows = jnp.stack([_tokens_before(qkv, ctx, conv0, jnp.broadcast_to(p, start.shape))
                                 for p in ctx.capture])
            caches = _put_gdn(caches, index, windows, captured, prefix="capture_")
        return self._out(o, x), caches

    def decode(self, x, ctx: ShardContext, caches, index):
        cfg = self.cfg
        conv0 = jax.lax.dynamic_index_in_dim(caches["conv"], index, 0, keepdims=False)
        state0 = jax.lax.dynamic_index_in_dim(caches["state"], index, 0, keepdims=False)
        qkv = linear(x, self.in_proj_qkv)  # [B, 1, Cd]
        window = jnp.concatenate([conv0.astype(qkv.dtype), qkv], axis=1)  # [B, K, Cd]
        conv = causal_conv(qkv, self.conv_weight[...], window[:, :-1])
        q, k, v = split_heads(conv[:, 0], cfg)
        g, beta = self._gates(x)
        o, state = gated_delta_rule_step(q, k, v, g[:, 0], beta[:, 0], state0, kernels=ctx.kernels)
        return self._out(o[:, None], x), _put_gdn(caches, index, window[:, 1:], state)


def _put_gdn(caches, index, conv, state, prefix=""):
    put = lambda buf, a: jax.lax.dynamic_update_index_in_dim(buf, a.astype(buf.dtype), index, 0)
    return dict(caches, **{prefix + "conv": put(caches[prefix + "conv"], conv),
                           prefix + "state": put(caches[prefix + "state"], state)})


def _tokens_before(x, ctx: ShardContext, initial, end):
    """The K-1 inputs before position `end` [B] in each row (the conv state a prefix ending there leaves),
    wherever they live. x [B, T, Cd] local pre-conv tokens; initial [B, K-1, Cd] precedes the piece's
    first position. Positions before the piece come from `initial`. A gather of K-1 rows per rank (the
    one rank holding a position contributes it, the others zeros), so no temporary grows with T."""
    h = initial.shape[1]
    start = ctx.pmin(jnp.min(ctx.positions, axis=1))  # [B] first position of this piece
    target = end[:, None] - h + jnp.arange(h)[None, :]  # [B, K-1] wanted positions
    match = (ctx.positions[:, None, :] == target[:, :, None]) & ctx.valid[:, None, :]  # [B, K-1, T]
    local = jnp.argmax(match, axis=-1)  # [B, K-1] where it sits here (0 when absent; masked below)
    here = jnp.take_along_axis(x, local[..., None], axis=1)
    from_here = ctx.psum(jnp.where(jnp.any(match, axis=-1)[..., None], here, jnp.zeros((), x.dtype)))
    back = target - start[:, None]  # < 0: before this piece, read `initial` at h + back
    carried = jnp.take_along_axis(initial.astype(x.dtype), jnp.clip(h + back, 0, h - 1)[..., None], axis=1)
    carried = jnp.where((h + back >= 0)[..., None], carried, jnp.zeros((), x.dtype))
    return jnp.where((back >= 0)[..., None], from_here, carried)


# Channel mixers ------------------------------------------------------------------------------------
class MLP(nnx.Module):
    def __init__(self, params: dict, prefix: str, dtype):
        for n in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, n, _param(params, f"{prefix}.{n}", dtype))

    def __call__(self, x):
        return linear(jax.nn.silu(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)


class MoE(nnx.Module):
    """Softmax router (fp32) → top-k → experts run as a grouped matmul over tokens sorted by expert
    (work ∝ tokens·k, never tokens·E) → weighted combine; plus a sigmoid-gated shared expert."""

    def __init__(self, cfg: ModelConfig, params: dict, prefix: str, dtype):
        self.cfg = cfg
        for n in ("router", "gate_proj", "up_proj", "down_proj"):
            setattr(self, n, _param(params, f"{prefix}.{n}", dtype))
        if cfg.shared_expert_intermediate_size:
            self.shared = MLP(params, f"{prefix}.shared", dtype)
            self.shared_gate = _param(params, f"{prefix}.shared_gate", dtype)

    def route(self, x):
        """x [T, D] -> (weights [T, k] fp32, experts [T, k] int32): softmax in fp32, top-k, renormalised
        if `norm_topk_prob`."""
        probs = jax.nn.softmax((x @ self.router[...]).astype(jnp.float32), axis=-1)
        top_w, top_e = jax.lax.top_k(probs, self.cfg.num_experts_per_tok)
        if self.cfg.norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        return top_w, top_e

    def experts(self, xs, group_sizes, kernels):
        """xs [n, D] rows sorted by local expert -> [n, D]: each row through its expert's SwiGLU
        (rows past sum(group_sizes) give 0)."""
        if isinstance(self.gate_proj, Fp8Matrix):  # FP8 experts (pcp_jax.fp8), [E, N, K] with block scales
            from pcp_jax.kernels.fp8 import api as fp8
            pair = lambda w: (w.values[...], w.scale[...])
            opts = dict(activations=self.gate_proj.activations, kernels=kernels)
            h = fp8.grouped_swiglu(xs, pair(self.gate_proj), pair(self.up_proj), self.gate_proj.block, group_sizes,
                                   **opts)
            return fp8.grouped_matmul(h, *pair(self.down_proj), self.down_proj.block, group_sizes, **opts)
        h = grouped_swiglu(xs, self.gate_proj[...], self.up_proj[...], group_sizes, kernels=kernels)
        return grouped_matmul(h, self.down_proj[...], group_sizes, kernels=kernels)

    def shared_expert(self, x):
        """x [T, D] -> the sigmoid-gated shared expert [T, D] (this shard's columns of it), or 0 without one."""
        if not self.cfg.shared_expert_intermediate_size:
            return jnp.zeros((), x.dtype)
        return jax.nn.sigmoid(x @ self.shared_gate[...]) * self.shared(x)

    def __call__(self, x, ctx: ShardContext):
        """x [..., D] -> this shard's partial output [..., D]: its own experts' share of the routed tokens
        (expert parallel over `tp`: the shard holds experts [r·E/T, (r+1)·E/T)) plus its columns of the
        shared expert. Every shard routes every token (the router is replicated), so routing is exact."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_w, top_e = self.route(x)
        mine = self.gate_proj.shape[0]  # experts held here
        order, slot, group_sizes = sort_by_expert(top_e, ctx.tp_rank * mine, mine)
        xs = jnp.take(x, order // self.cfg.num_experts_per_tok, axis=0)
        y = self.experts(xs, group_sizes, ctx.kernels)
        out = combine_experts(y, slot, top_w, jnp.sum(group_sizes)) + self.shared_expert(x)
        return out.reshape(shape)


# Decoder layer, layer plan and model -------------------------------------------------------------
class DecoderLayer(nnx.Module):
    """One decoder layer: `layer_type` picks the token mixer; parameters are read from `prefix` (a flat
    layer prefix such as `layers.3`, or stacked arrays [G, ...] of a scanned group position)."""

    def __init__(self, cfg: ModelConfig, layer_type: str, params: dict, prefix: str, dtype):
        self.cfg = cfg
        self.is_attention = layer_type == FULL_ATTENTION
        self.input_norm = _param(params, f"{prefix}.input_norm", dtype)
        self.post_norm = _param(params, f"{prefix}.post_norm", dtype)
        if self.is_attention:
            self.attn = GatedAttention(cfg, params, f"{prefix}.attn", dtype)
        else:
            self.gdn = GatedDeltaNet(cfg, params, f"{prefix}.gdn", dtype)
        if cfg.is_moe:
            self.moe = MoE(cfg, params, f"{prefix}.moe", dtype)
        else:
            self.mlp = MLP(params, f"{prefix}.mlp", dtype)

    def _channel(self, x, ctx):
        h = rms_norm(x, self.post_norm[...], self.cfg.rms_norm_eps)
        return x + ctx.tp_sum(self.moe(h, ctx) if self.cfg.is_moe else self.mlp(h))

    def prefill(self, x, ctx: ShardContext, caches, index, history):
        h = rms_norm(x, self.input_norm[...], self.cfg.rms_norm_eps)
        mixer = self.attn if self.is_attention else self.gdn
        y, caches = mixer.prefill(h, ctx, caches, index, history)
        return self._channel(x + ctx.tp_sum(y), ctx), caches

    def decode(self, x, ctx: ShardContext, caches, index, kpos, write, attention="dense"):
        h = rms_norm(x, self.input_norm[...], self.cfg.rms_norm_eps)
        if self.is_attention:
            y, caches = self.attn.decode(h, ctx, caches, index, kpos, write, attention)
        else:
            y, caches = self.gdn.decode(h, ctx, caches, index)
        return self._channel(x + ctx.tp_sum(y), ctx), caches


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How the layers run: `groups` whole periods of `layer_types` as one `lax.scan` over stacked weights
    (layer g·period + j is group g, position j), then the `rest` unrolled. A layout with no period that
    repeats at least twice runs fully unrolled (groups = 0). Each layer's cache index is its ordinal among
    the layers of its kind, so the stacked caches are in layer order: position j of group g has index
    `base[j] + g * per_group[j]`."""
    layer_types: tuple[str, ...]
    period: int
    groups: int

    @classmethod
    def of(cls, layer_types) -> "LayerPlan":
        types = tuple(layer_types)
        n = len(types)
        period = next(p for p in range(1, n + 1) if all(types[i] == types[i % p] for i in range(n)))
        groups = n // period
        return cls(types, period, groups if groups >= 2 else 0)

    @property
    def rest(self) -> tuple[int, ...]:
        return tuple(range(self.groups * self.period, len(self.layer_types)))

    def ordinal(self, i: int) -> int:
        """Index of layer i in the stacked cache of its kind."""
        return sum(t == self.layer_types[i] for t in self.layer_types[:i])

    def group_index(self, j: int, g):
        """Cache index of position j of group g (g traced)."""
        kind = self.layer_types[j]
        per_group = sum(t == kind for t in self.layer_types[: self.period])
        return self.ordinal(j) + g * per_group


class Qwen35(nnx.Module):
    """The text model. `params` are the device parameters of `pcp_jax.parallel.tensor.placements` for this
    config's `LayerPlan` and `tp` (`place_params` makes them from the flat checkpoint contract: scanned
    layers stacked as `group.{j}.<leaf>`, the rest flat, each split over `tp`); arrays are cast to `dtype`.
    The modules are built with the config of one `tp` shard (`local_config`)."""

    def __init__(self, cfg: ModelConfig, params: dict, dtype=jnp.bfloat16, tp: int = 1):
        self.cfg = cfg = local_config(cfg, tp)
        self.plan = plan = LayerPlan.of(cfg.layer_types)
        self.embed = _param(params, "embed", dtype)
        self.group = _ModuleList([DecoderLayer(cfg, plan.layer_types[j], params, f"group.{j}", dtype)
                                  for j in range(plan.period if plan.groups else 0)])
        self.rest = _ModuleList([DecoderLayer(cfg, plan.layer_types[i], params, f"layers.{i}", dtype)
                                 for i in plan.rest])
        self.final_norm = _param(params, "final_norm", dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(params, "lm_head", dtype)

    def embed_tokens(self, ids, ctx: ShardContext):
        """ids [B, T] -> [B, T, D]. Under `tp` each shard holds a block of vocabulary rows: it looks up the ids
        in its block, zeros elsewhere, and the shards' rows are summed (exact: one of them is non-zero)."""
        table = self.embed[...]
        if ctx.tp == 1:
            return jnp.take(table, ids, axis=0)
        rows = table.shape[0]
        local = ids - ctx.tp_rank * rows
        here = (local >= 0) & (local < rows)
        x = jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0)
        return ctx.tp_sum(jnp.where(here[..., None], x, jnp.zeros((), x.dtype)))

    def _layers(self, x, caches, step, scan=True):
        """Run every layer: `step(layer, x, caches, index) -> (x, caches)`; the groups as one scan (one
        compiled body), or with `scan=False` unrolled with static group indices (the weights and cache
        entries of each layer are then static slices of the stacked arrays)."""
        plan = self.plan
        graphdef, stacked = nnx.split(self.group)
        if plan.groups and not scan:
            for g in range(plan.groups):
                for j, layer in enumerate(nnx.merge(graphdef, jax.tree.map(lambda a: a[g], stacked))):
                    x, caches = step(layer, x, caches, plan.group_index(j, g))
        elif plan.groups:
            def body(carry, xs):
                x, caches = carry
                g, weights = xs
                for j, layer in enumerate(nnx.merge(graphdef, weights)):
                    x, caches = step(layer, x, caches, plan.group_index(j, g))
                return (x, caches), None

            (x, caches), _ = jax.lax.scan(body, (x, caches), (jnp.arange(plan.groups, dtype=jnp.int32), stacked))
        for i, layer in zip(plan.rest, self.rest):
            x, caches = step(layer, x, caches, plan.ordinal(i))
        return x, caches

    def prefill(self, ids, ctx: ShardContext, caches: dict, history: "History"):
        """ids [B, T] this rank's tokens of one prefill piece; caches: the stacked caches (`Caches`).
        Returns (hidden [B, T, D] before the final norm, updated caches)."""
        return self._layers(self.embed_tokens(ids, ctx), caches,
                            lambda layer, x, c, i: layer.prefill(x, ctx, c, i, history))

    def decode(self, ids, ctx: ShardContext, caches: dict, kpos, write, scan=True, attention="dense"):
        """ids [B, 1] the same on every rank. Returns (logits [B, V] fp32, updated caches). `attention`:
        how attention layers read their cache (kernels.attention.api.decode_attention_stacked)."""
        x, caches = self._layers(self.embed_tokens(ids, ctx), caches,
                                 lambda layer, x, c, i: layer.decode(x, ctx, c, i, kpos, write, attention), scan)
        return self.head(x[:, 0], ctx), caches

    def head(self, x, ctx: ShardContext):
        """x [..., D] -> logits [..., V] fp32 (each `tp` shard computes its vocabulary block; gathered)."""
        x = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return ctx.tp_gather(jnp.dot(x, w, preferred_element_type=jnp.float32), axis=-1)


def empty_caches(cfg: ModelConfig, batch: int, slots: int, dtype) -> dict:
    """Stacked caches for `cfg` (one shard's with a `local_config`, the mesh's with a `mesh_config`): "k", "v" [n_attention, B, slots, Hkv, hd] (this rank's KV slots of every
    attention layer, in layer order), "conv" [n_gdn, B, K-1, conv_dim] and "state" [n_gdn, B, Hv, dk, dv]
    fp32 (every GDN layer's carried state)."""
    na, ng = len(cfg.attention_layers), len(cfg.gdn_layers)
    kv = jnp.zeros((na, batch, slots, cfg.num_kv_heads, cfg.head_dim), dtype)
    return {"k": kv, "v": jnp.zeros_like(kv),
            "conv": jnp.zeros((ng, batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
            "state": jnp.zeros((ng, batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                cfg.linear_value_head_dim), jnp.float32)}

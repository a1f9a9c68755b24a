"""Every compiled program of a model, described once by a static signature.

A signature is a small frozen dataclass (`Alloc`, `Prefill`, `Decode`, `Sample`, `CopyBlock`, `RestoreBlock`,
`CopyStates`) holding the shapes that make one program differ from another (batch, padded piece length, cache
capacity, ...). Together with the model's `ProgramContext` (config, mesh, dtype, kernels, GDN strategy: what
every program of one model shares) it gives
- `build(ctx)`: the jitted function (one `shard_map` over the ("cp", "tp") mesh, per-shard code as in
  pcp_jax/model.py), and
- `abstract_args(ctx)`: its arguments as `jax.ShapeDtypeStruct`s with their shardings, exactly as the
  request path passes them.
The request path (pcp_jax/engine.py), `Model.warmup`, background compiling and the on-disk store
(pcp_jax/compiled.py, pcp_jax/program_store.py) all name programs by these signatures, so a program is never
described twice. `repr(signature)` and `ProgramContext.describe()` are the store's key material.

Shapes: B rows, C = cp ranks, S = cache slots per rank (a capacity of pcp_jax.buckets), V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pcp_jax import sampling
from pcp_jax.config import ModelConfig
from pcp_jax.model import History, empty_caches, write_slot
from pcp_jax.parallel.context import ShardContext
from pcp_jax.parallel.gdn_cp import resolve_strategy
from pcp_jax.parallel.tensor import local_config, mesh_config
from pcp_jax.parallel.zigzag import local_positions, rank_index
from pcp_jax.sharding import CACHES, CP_AXIS, KV_SLOTS, REPLICATED, STACKED_KV, TOKENS, TP_AXIS


@dataclasses.dataclass(frozen=True, eq=False)
class ProgramContext:
    """What every program of one model shares. `graphdef` and `state` are the model's `nnx.split` (the state
    may be abstract: `jax.ShapeDtypeStruct`s with shardings); `kernels` and `decode` choices are resolved."""
    cfg: ModelConfig
    mesh: Mesh
    dtype: Any               # the model dtype (jnp.bfloat16 or jnp.float32)
    kernels: str             # "auto" | "jnp" | "gpu"
    gdn_strategy: str        # "auto" | "batch" | "sequence" (resolved per batch size inside)
    scan_decode: bool
    graphdef: Any
    state: Any
    weights: str = "model"   # how the weights are stored (pcp_jax.fp8.describe_weights): FP8 ones change programs

    @property
    def cp(self) -> int:
        return self.mesh.shape[CP_AXIS]

    @property
    def tp(self) -> int:
        return self.mesh.shape[TP_AXIS]

    @property
    def state_specs(self):
        return jax.tree.map(lambda a: a.sharding.spec, self.state)

    def describe(self) -> str:
        """Everything besides the signature that decides a compiled program, as text (for the store's keys):
        the config, dtype, mesh shape and devices, kernel and strategy choices, the weights' storage."""
        devices = [(d.id, d.process_index) for d in self.mesh.devices.flat]
        return repr((self.cfg, jnp.dtype(self.dtype).name, dict(self.mesh.shape), self.mesh.axis_names, devices,
                     self.kernels, self.gdn_strategy, self.scan_decode, self.weights))

    # Helpers of the abstract arguments --------------------------------------------------------------
    def spec(self, shape, dtype, partition) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(self.mesh, partition))

    def scalar(self, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return self.spec((), dtype, REPLICATED)

    def caches(self, batch: int, slots: int) -> dict:
        """The stacked caches of `batch` rows and `slots` slots per rank, abstract (model.empty_caches)."""
        shapes = jax.eval_shape(lambda: empty_caches(mesh_config(self.cfg, self.tp), batch, self.cp * slots,
                                                     self.dtype))
        return jax.tree.map(lambda a, s: self.spec(a.shape, a.dtype, s), shapes, CACHES)

    def kpos(self, batch: int, slots: int) -> jax.ShapeDtypeStruct:
        return self.spec((batch, self.cp * slots), jnp.int32, KV_SLOTS)

    def shard_context(self, strategy: str, positions, lengths) -> ShardContext:
        """Inside the shard_map: this shard's ShardContext."""
        tp_rank = jax.lax.axis_index(TP_AXIS) if self.tp > 1 else 0
        return ShardContext(CP_AXIS, self.cp, strategy, self.kernels, rank_index(CP_AXIS, self.cp), positions,
                            lengths, self.tp, TP_AXIS, tp_rank)


def _shard_jit(ctx: ProgramContext, per_shard, in_specs, out_specs, donate=()):
    return jax.jit(jax.shard_map(per_shard, mesh=ctx.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False),
                   donate_argnums=donate)


@dataclasses.dataclass(frozen=True)
class Alloc:
    """() -> (caches, kpos): empty stacked caches (model.empty_caches), allocated shard by shard: KV
    [NA, B, C*S, Hkv, hd] over `cp` (heads over `tp`), GDN states replicated over `cp`; slot positions
    [B, C*S] int32, -1 (empty)."""
    kind: ClassVar[str] = "alloc"
    batch: int
    slots: int

    def build(self, ctx: ProgramContext):
        cfg, batch, slots = local_config(ctx.cfg, ctx.tp), self.batch, self.slots

        def per_shard():
            return empty_caches(cfg, batch, slots, ctx.dtype), jnp.full((batch, slots), -1, jnp.int32)

        return _shard_jit(ctx, per_shard, (), (CACHES, KV_SLOTS))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        return ()


@dataclasses.dataclass(frozen=True)
class Prefill:
    """One prefill piece padded to `n_pad` tokens (zigzag over `cp`), written into the slots at `offset`.

    (state, ids [B, n_pad] zigzag, lengths [B], piece_start, piece_len, offset, logits [B, V] fp32, caches,
    kpos) -> (logits [B, V], edge [B, V], caches, kpos, every [B, n_pad, V] or None); caches and kpos are
    donated. The piece's start and length are traced, so every prompt whose pieces pad to n_pad shares the
    program. A piece's padding overlaps the next piece's positions, so tokens count as real only below
    min(length, piece_start + piece_len). `logits` is returned for rows whose last token is not in this
    piece; `edge` are the logits after the piece's last position (for the prefix cache); `every` (with
    `all_logits`) the logits of every local token. `with_history`: attend to the slots of earlier pieces."""
    kind: ClassVar[str] = "prefill"
    batch: int
    n_pad: int
    slots: int
    all_logits: bool
    with_history: bool

    def build(self, ctx: ProgramContext):
        C, lc = ctx.cp, self.n_pad // (2 * ctx.cp)
        strategy = resolve_strategy(ctx.gdn_strategy, self.batch, C)
        graphdef, all_logits, with_history = ctx.graphdef, self.all_logits, self.with_history

        def per_shard(state, ids, lengths, piece_start, piece_len, offset, logits, caches, kpos):
            model = nnx.merge(graphdef, state)
            rank = rank_index(CP_AXIS, C)
            pos = jnp.broadcast_to(piece_start + local_positions(rank, C, lc), ids.shape)
            sc = ctx.shard_context(strategy, pos, jnp.minimum(lengths, piece_start + piece_len))
            history = History(offset, offset // (2 * lc) if with_history else None, kpos)
            x, caches = model.prefill(ids, sc, caches, history)
            kpos = jax.lax.dynamic_update_slice_in_dim(kpos, jnp.where(sc.valid, pos, -1), offset, axis=1)
            hidden_at = lambda mask: sc.psum(jnp.einsum("bt,btd->bd", mask.astype(x.dtype), x))
            is_last = (pos == lengths[:, None] - 1) & sc.valid
            has_last = sc.psum(jnp.sum(is_last, axis=1)) > 0
            logits = jnp.where(has_last[:, None], model.head(hidden_at(is_last), sc), logits)
            edge = model.head(hidden_at((pos == piece_start + piece_len - 1) & sc.valid), sc)
            every = model.head(x, sc) if all_logits else None
            return logits, edge, caches, kpos, every

        return _shard_jit(ctx, per_shard,
                          (ctx.state_specs, TOKENS, REPLICATED, REPLICATED, REPLICATED, REPLICATED, REPLICATED,
                           CACHES, KV_SLOTS),
                          (REPLICATED, REPLICATED, CACHES, KV_SLOTS, TOKENS if all_logits else None),
                          donate=(7, 8))  # not `logits`: it may be a prefix-cache entry's

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        B = self.batch
        return (ctx.state, ctx.spec((B, self.n_pad), jnp.int32, TOKENS), ctx.spec((B,), jnp.int32, REPLICATED),
                ctx.scalar(), ctx.scalar(), ctx.scalar(), ctx.spec((B, ctx.cfg.vocab_size), jnp.float32, REPLICATED),
                ctx.caches(B, self.slots), ctx.kpos(B, self.slots))


@dataclasses.dataclass(frozen=True)
class Decode:
    """One decode step: (state, packed [2B + 2] int32, caches, kpos) -> (logits [B, V] fp32, caches, kpos),
    caches and kpos donated. packed = tokens [B], positions [B], owner rank, slot: one host-to-device
    transfer per step. `attention`: how attention layers read their cache
    (kernels.attention.api.decode_attention_stacked)."""
    kind: ClassVar[str] = "decode"
    batch: int
    slots: int
    attention: str

    def build(self, ctx: ProgramContext):
        batch, graphdef, attention = self.batch, ctx.graphdef, self.attention

        def per_shard(state, packed, caches, kpos):
            tokens, positions, owner, slot = packed[:batch], packed[batch:2 * batch], packed[2 * batch], packed[-1]
            model = nnx.merge(graphdef, state)
            sc = ctx.shard_context("sequence", positions[:, None], positions + 1)
            kpos = write_slot(kpos, positions[:, None], sc, (owner, slot))
            logits, caches = model.decode(tokens[:, None], sc, caches, kpos, (owner, slot), scan=ctx.scan_decode,
                                          attention=attention)
            return logits, caches, kpos

        return _shard_jit(ctx, per_shard, (ctx.state_specs, REPLICATED, CACHES, KV_SLOTS),
                          (REPLICATED, CACHES, KV_SLOTS), donate=(2, 3))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        return (ctx.state, ctx.spec((2 * self.batch + 2,), jnp.int32, REPLICATED), ctx.caches(self.batch, self.slots),
                ctx.kpos(self.batch, self.slots))


@dataclasses.dataclass(frozen=True)
class Sample:
    """(logits [B, V] fp32, seed uint32, temperature f32, top_k i32, top_p f32, feed [2B + 3] int32) ->
    (tokens [B] int32, packed [2B + 2] int32), both replicated. feed = per row the id to feed instead of the
    sampled one (>= 0: the row is finished) or -1, then the decode step's positions, owner and slot, then the
    step (it seeds sampling with `seed`). packed is the next decode step's input, made on the device so that
    the step can be queued before the host has seen the sampled tokens. Greedy programs ignore the settings."""
    kind: ClassVar[str] = "sample"
    batch: int
    greedy: bool

    def build(self, ctx: ProgramContext):
        greedy = self.greedy

        def sample_and_pack(logits, seed, temperature, top_k, top_p, feed):
            B = logits.shape[0]
            tokens = sampling.sample(logits, jax.random.key(seed), feed[-1], temperature, top_k, top_p, greedy=greedy)
            fed = jnp.where(feed[:B] >= 0, feed[:B], tokens)
            return tokens, jnp.concatenate([fed, feed[B:-1]])

        out = NamedSharding(ctx.mesh, REPLICATED)
        return jax.jit(sample_and_pack, out_shardings=(out, out))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        B = self.batch
        return (ctx.spec((B, ctx.cfg.vocab_size), jnp.float32, REPLICATED), ctx.scalar(jnp.uint32),
                ctx.scalar(jnp.float32), ctx.scalar(jnp.int32), ctx.scalar(jnp.float32),
                ctx.spec((2 * B + 3,), jnp.int32, REPLICATED))


@dataclasses.dataclass(frozen=True)
class CopyBlock:
    """(k, v, kpos, offset) -> (k, v, kpos) of `block` slots from slot `offset` of every rank's KV shard of
    every attention layer: K/V [NA, B, C*block, Hkv, hd] and kpos [B, C*block], still split over `cp`."""
    kind: ClassVar[str] = "copy_block"
    batch: int
    block: int
    slots: int

    def build(self, ctx: ProgramContext):
        block = self.block

        def per_shard(k, v, kpos, offset):
            take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, offset, block, axis=axis)
            return take(k, 2), take(v, 2), take(kpos, 1)

        return _shard_jit(ctx, per_shard, (STACKED_KV, STACKED_KV, KV_SLOTS, REPLICATED),
                          (STACKED_KV, STACKED_KV, KV_SLOTS))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        caches = ctx.caches(self.batch, self.slots)
        return caches["k"], caches["v"], ctx.kpos(self.batch, self.slots), ctx.scalar()


@dataclasses.dataclass(frozen=True)
class RestoreBlock:
    """(k, v, kpos, k_block, v_block, kpos_block, offset) -> (k, v, kpos) with a `CopyBlock` result written
    back at slot `offset` of every rank's shard; k, v and kpos are donated (updated in place)."""
    kind: ClassVar[str] = "restore_block"
    batch: int
    block: int
    slots: int

    def build(self, ctx: ProgramContext):
        def per_shard(k, v, kpos, k_block, v_block, kpos_block, offset):
            put = lambda a, b, axis: jax.lax.dynamic_update_slice_in_dim(a, b, offset, axis=axis)
            return put(k, k_block, 2), put(v, v_block, 2), put(kpos, kpos_block, 1)

        specs = (STACKED_KV, STACKED_KV, KV_SLOTS)
        return _shard_jit(ctx, per_shard, specs + specs + (REPLICATED,), specs, donate=(0, 1, 2))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        caches = ctx.caches(self.batch, self.slots)
        blocks = CopyBlock(self.batch, self.block, self.slots)
        k_block = ctx.spec(caches["k"].shape[:2] + (ctx.cp * self.block,) + caches["k"].shape[3:], ctx.dtype,
                           STACKED_KV)
        return (caches["k"], caches["v"], ctx.kpos(self.batch, self.slots), k_block, k_block,
                ctx.kpos(self.batch, self.block), blocks.abstract_args(ctx)[-1])


@dataclasses.dataclass(frozen=True)
class CopyStates:
    """(conv, state, logits) -> copies of them: the GDN conv [NG, B, K-1, conv] and recurrent states
    [NG, B, Hv, dk, dv] and next-token logits [B, V] at a boundary, kept apart from the caches that later
    pieces update in place."""
    kind: ClassVar[str] = "copy_states"
    batch: int

    def build(self, ctx: ProgramContext):
        return jax.jit(lambda conv, state, logits: (jnp.copy(conv), jnp.copy(state), jnp.copy(logits)))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        caches = ctx.caches(self.batch, 1)
        return caches["conv"], caches["state"], ctx.spec((self.batch, ctx.cfg.vocab_size), jnp.float32, REPLICATED)


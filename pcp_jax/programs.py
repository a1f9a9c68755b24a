"""Every compiled program of a model, described once by a static signature.

A signature is a small frozen dataclass (`Alloc`, `Prefill`, `Decode`, `Sample`, and the prefix cache's
`CopyBlock`, `RestoreSegment`, `RestoreStates`, `SnapshotStates`) holding the shapes that make one program
differ from another (batch, padded piece length, cache capacity, ...). Together with the model's
`ProgramContext` (config, mesh, dtype, kernels, GDN strategy: what every program of one model shares) it
gives
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
from pcp_jax.sharding import (CACHES, CAPTURED_CONV, CAPTURED_STATE, CP_AXIS, KV_SLOTS, REPLICATED, STACKED_KV,
                              TOKENS, TP_AXIS)


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

    def shard_context(self, strategy: str, positions, lengths, capture=None) -> ShardContext:
        """Inside the shard_map: this shard's ShardContext."""
        tp_rank = jax.lax.axis_index(TP_AXIS) if self.tp > 1 else 0
        return ShardContext(CP_AXIS, self.cp, strategy, self.kernels, rank_index(CP_AXIS, self.cp), positions,
                            lengths, self.tp, TP_AXIS, tp_rank, capture)

    def captured(self, batch: int) -> dict:
        """What a capturing prefill returns (Prefill), abstract."""
        caches = self.caches(batch, 1)
        grow = lambda a, spec: self.spec((a.shape[0], CAPTURES) + a.shape[1:], a.dtype, spec)
        return {"conv": grow(caches["conv"], CAPTURED_CONV), "state": grow(caches["state"], CAPTURED_STATE),
                "logits": self.spec((CAPTURES, batch, self.cfg.vocab_size), jnp.float32, REPLICATED)}


def _named(fn, kind: str):
    """`fn` named after its program's kind: JAX's compile logs and `jax.monitoring` events carry the name."""
    fn.__name__ = fn.__qualname__ = kind
    return fn


def _shard_jit(ctx: ProgramContext, kind: str, per_shard, in_specs, out_specs, donate=()):
    return jax.jit(jax.shard_map(_named(per_shard, kind), mesh=ctx.mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False), donate_argnums=donate)


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

        return _shard_jit(ctx, self.kind, per_shard, (), (CACHES, KV_SLOTS))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        return ()


CAPTURES = 2  # GDN states a capturing prefill keeps: the prefix cache's last two block boundaries


@dataclasses.dataclass(frozen=True)
class Prefill:
    """One prefill piece padded to `n_pad` tokens (zigzag over `cp`), written into the slots at `offset`.

    (state, ids [B, n_pad] zigzag, lengths [B], piece_start, piece_len, offset, logits [B, V] fp32, caches,
    kpos[, capture [CAPTURES] int32]) -> (logits [B, V], caches, kpos, every [B, n_pad, V] or None, captured or
    None); caches and kpos are donated. The piece's start and length are traced, so every prompt whose pieces
    pad to n_pad shares the program. A piece's padding overlaps the next piece's positions, so tokens count as
    real only below min(length, piece_start + piece_len). `logits` is returned for rows whose last token is not
    in this piece; `every` (with `all_logits`) the logits of every local token. `with_history`: attend to the
    slots before `offset` (earlier pieces, or a prefix the prefix cache restored). `capture` (prefix cache on):
    positions in this piece (else -1) whose state a later prompt resumes from: captured = {"conv"
    [NG, P, B, K-1, Cd], "state" [NG, P, B, Hv, dk, dv] fp32, "logits" [P, B, V] (after position p - 1)}, from
    the one-shot pass itself (the GDN kernels keep the state where they pass p)."""
    kind: ClassVar[str] = "prefill"
    batch: int
    n_pad: int
    slots: int
    all_logits: bool
    with_history: bool
    capture: bool = False

    def build(self, ctx: ProgramContext):
        C, lc = ctx.cp, self.n_pad // (2 * ctx.cp)
        strategy = resolve_strategy(ctx.gdn_strategy, self.batch, C)
        graphdef, all_logits, with_history, capture = ctx.graphdef, self.all_logits, self.with_history, self.capture
        cfg = local_config(ctx.cfg, ctx.tp)

        def per_shard(state, ids, lengths, piece_start, piece_len, offset, logits, caches, kpos, *where):
            model = nnx.merge(graphdef, state)
            rank = rank_index(CP_AXIS, C)
            pos = jnp.broadcast_to(piece_start + local_positions(rank, C, lc), ids.shape)
            sc = ctx.shard_context(strategy, pos, jnp.minimum(lengths, piece_start + piece_len),
                                   capture=where[0] if capture else None)
            if capture:
                blank = empty_caches(cfg, ids.shape[0], 1, ctx.dtype)
                caches = dict(caches, **{f"capture_{n}": jnp.zeros((blank[n].shape[0], CAPTURES) + blank[n].shape[1:],
                                                                  blank[n].dtype) for n in ("conv", "state")})
            history = History(offset, offset // (2 * lc) if with_history else None, kpos)
            x, caches = model.prefill(ids, sc, caches, history)
            kpos = jax.lax.dynamic_update_slice_in_dim(kpos, jnp.where(sc.valid, pos, -1), offset, axis=1)
            hidden_at = lambda mask: sc.psum(jnp.einsum("bt,btd->bd", mask.astype(x.dtype), x))
            is_last = (pos == lengths[:, None] - 1) & sc.valid
            has_last = sc.psum(jnp.sum(is_last, axis=1)) > 0
            logits = jnp.where(has_last[:, None], model.head(hidden_at(is_last), sc), logits)
            every = model.head(x, sc) if all_logits else None
            captured = None
            if capture:
                captured = {n: caches.pop(f"capture_{n}") for n in ("conv", "state")}
                captured["logits"] = jnp.stack([model.head(hidden_at((pos == p - 1) & sc.valid), sc) for p in where[0]])
            return logits, caches, kpos, every, captured

        captured_specs = {"conv": CAPTURED_CONV, "state": CAPTURED_STATE, "logits": REPLICATED} if capture else None
        return _shard_jit(ctx, self.kind, per_shard,
                          (ctx.state_specs, TOKENS, REPLICATED, REPLICATED, REPLICATED, REPLICATED, REPLICATED,
                           CACHES, KV_SLOTS) + ((REPLICATED,) if capture else ()),
                          (REPLICATED, CACHES, KV_SLOTS, TOKENS if all_logits else None, captured_specs),
                          donate=(7, 8))  # not `logits`: it may be a prefix-cache entry's

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        B = self.batch
        return (ctx.state, ctx.spec((B, self.n_pad), jnp.int32, TOKENS), ctx.spec((B,), jnp.int32, REPLICATED),
                ctx.scalar(), ctx.scalar(), ctx.scalar(), ctx.spec((B, ctx.cfg.vocab_size), jnp.float32, REPLICATED),
                ctx.caches(B, self.slots), ctx.kpos(B, self.slots)) + (
                    (ctx.spec((CAPTURES,), jnp.int32, REPLICATED),) if self.capture else ())


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

        return _shard_jit(ctx, self.kind, per_shard, (ctx.state_specs, REPLICATED, CACHES, KV_SLOTS),
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
        return jax.jit(_named(sample_and_pack, self.kind), out_shardings=(out, out))

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

        return _shard_jit(ctx, self.kind, per_shard, (STACKED_KV, STACKED_KV, KV_SLOTS, REPLICATED),
                          (STACKED_KV, STACKED_KV, KV_SLOTS))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        caches = ctx.caches(self.batch, self.slots)
        return caches["k"], caches["v"], ctx.kpos(self.batch, self.slots), ctx.scalar()


@dataclasses.dataclass(frozen=True)
class RestoreSegment:
    """(k, v, kpos, k_seg, v_seg, kpos_seg, offset, limit) -> (k, v, kpos): a `CopyBlock` result (a segment of
    `block` slots per rank) written back at slot `offset` of every rank's shard, its slots holding positions
    at or past `limit` marked empty (-1): a later prompt shares the segment's prefix only up to there. k, v
    and kpos are donated (updated in place)."""
    kind: ClassVar[str] = "restore_segment"
    batch: int
    block: int
    slots: int

    def build(self, ctx: ProgramContext):
        def per_shard(k, v, kpos, k_seg, v_seg, kpos_seg, offset, limit):
            put = lambda a, b, axis: jax.lax.dynamic_update_slice_in_dim(a, b, offset, axis=axis)
            return put(k, k_seg, 2), put(v, v_seg, 2), put(kpos, jnp.where(kpos_seg < limit, kpos_seg, -1), 1)

        specs = (STACKED_KV, STACKED_KV, KV_SLOTS)
        return _shard_jit(ctx, self.kind, per_shard, specs + specs + (REPLICATED, REPLICATED), specs,
                          donate=(0, 1, 2))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        caches = ctx.caches(self.batch, self.slots)
        seg = ctx.spec(caches["k"].shape[:2] + (ctx.cp * self.block,) + caches["k"].shape[3:], ctx.dtype, STACKED_KV)
        return (caches["k"], caches["v"], ctx.kpos(self.batch, self.slots), seg, seg,
                ctx.kpos(self.batch, self.block), ctx.scalar(), ctx.scalar())


@dataclasses.dataclass(frozen=True)
class RestoreStates:
    """(captured, index) -> (conv [NG, B, K-1, Cd], state [NG, B, Hv, dk, dv], logits [B, V]): capture
    `index` of a capturing prefill's (or `SnapshotStates`') captured dict, as new arrays (a prefill updates
    its caches in place, so it must not be given the cache's own)."""
    kind: ClassVar[str] = "restore_states"
    batch: int

    def build(self, ctx: ProgramContext):
        def restore(captured, index):
            take = lambda a, axis: jax.lax.dynamic_index_in_dim(a, index, axis, keepdims=False)
            return take(captured["conv"], 1), take(captured["state"], 1), take(captured["logits"], 0)

        out = NamedSharding(ctx.mesh, REPLICATED)
        return jax.jit(_named(restore, self.kind), out_shardings=(NamedSharding(ctx.mesh, CACHES["conv"]),
                                                                   NamedSharding(ctx.mesh, CACHES["state"]), out))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        return ctx.captured(self.batch), ctx.scalar()


@dataclasses.dataclass(frozen=True)
class SnapshotStates:
    """(captured, conv, state, logits, take [P, B] bool) -> a new captured dict: `captured` with, where `take`,
    capture p of row b replaced by that row's current conv and recurrent state and logits: how a generation
    keeps the states of the block boundaries its tokens cross (each row crosses at its own step). `captured`
    is not donated: it may be a prefix-cache entry's."""
    kind: ClassVar[str] = "snapshot_states"
    batch: int

    def build(self, ctx: ProgramContext):
        def snapshot(captured, conv, state, logits, take):
            put = lambda old, new, axis_b: jnp.where(
                take.reshape((1,) * (axis_b - 1) + take.shape + (1,) * (old.ndim - axis_b - 1)),
                jnp.expand_dims(new, axis_b - 1), old)
            return {"conv": put(captured["conv"], conv, 2), "state": put(captured["state"], state, 2),
                    "logits": put(captured["logits"], logits, 1)}

        return jax.jit(_named(snapshot, self.kind))

    def abstract_args(self, ctx: ProgramContext) -> tuple:
        caches = ctx.caches(self.batch, 1)
        return (ctx.captured(self.batch), caches["conv"], caches["state"],
                ctx.spec((self.batch, ctx.cfg.vocab_size), jnp.float32, REPLICATED),
                ctx.spec((CAPTURES, self.batch), jnp.bool_, REPLICATED))

"""The user-facing model: prefill, full-sequence logits and generation over a `cp` mesh.

Everything runs in one `shard_map` over the mesh axis `cp`: prompts are padded to a multiple of 2·C·64,
put in zigzag order and split over `cp` (pcp_jax.parallel.zigzag). The KV cache of full-attention layers
stays where prefill left it: each rank holds its own tokens' K/V plus a share of the decode slots (new
tokens go round-robin: decode step j writes on rank j mod C, at slot prefill_slots + j div C). GDN conv
and recurrent states are small and replicated. No rank ever holds the whole KV cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pcp_jax.config import FULL_ATTENTION, ModelConfig
from pcp_jax.kernels import KERNEL_CHOICES
from pcp_jax.kernels.backend import preload_gpu_backends
from pcp_jax.model import History, Qwen35, _write_slot
from pcp_jax.parallel.context import ShardContext
from pcp_jax.parallel.gdn_cp import resolve_strategy
from pcp_jax.parallel.zigzag import local_positions, padded_length, rank_index, token_permutation
from pcp_jax.sharding import CP_AXIS as AXIS
from pcp_jax.sharding import KV_SLOTS, REPLICATED, TOKENS
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def make_mesh(cp: int, devices=None) -> Mesh:
    """A 1-D mesh named `cp` over the first `cp` devices (of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp={cp!r} must be a positive integer")
    if cp > len(devices):
        raise ValueError(f"cp={cp} needs {cp} devices but only {len(devices)} are visible "
                         f"({jax.process_count()} process(es), backend {jax.default_backend()!r})")
    return Mesh(np.asarray(devices[:cp]), (AXIS,))


@dataclasses.dataclass
class PrefillResult:
    """What prefill leaves behind: next-token logits and the (sharded) caches to decode from."""
    logits: jax.Array          # [B, V] fp32, logits after each row's last prompt token
    lengths: np.ndarray        # [B] prompt lengths
    caches: list               # per layer: {"k","v"} [B, C*S, Hkv, hd] sharded on slots, or {"conv","state"}
    kpos: jax.Array            # [B, C*S] positions held by each KV slot (-1 empty), sharded like K/V
    slots_per_rank: int        # S
    prefill_slots: int         # slots per rank written by prefill; decode appends after them


class Model:
    """A Qwen3.5 model placed on a `cp` mesh. Build it with `pcp_jax.load_model` or `Model(cfg, params)`."""

    def __init__(self, cfg: ModelConfig, params: dict, *, cp: int = 1, mesh: Mesh | None = None,
                 dtype: str = "bfloat16", kernels: str = "auto", gdn_strategy: str = "auto"):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {list(_DTYPES)}")
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}; expected one of {list(KERNEL_CHOICES)}")
        resolve_strategy(gdn_strategy, 0, 1)  # validates the name
        if mesh is None:
            mesh = make_mesh(cp)
        elif AXIS not in mesh.axis_names:
            raise ValueError(f"mesh axes {mesh.axis_names} have no {AXIS!r} axis")
        elif cp not in (1, mesh.shape[AXIS]):
            raise ValueError(f"cp={cp} disagrees with the mesh's {AXIS!r} axis of size {mesh.shape[AXIS]}")
        self.cfg, self.mesh, self.dtype_name = cfg, mesh, dtype
        self.cp = mesh.shape[AXIS]
        self.kernels, self.gdn_strategy = kernels, gdn_strategy
        self.dtype = _DTYPES[dtype]
        preload_gpu_backends(kernels)  # before any trace: see kernels/backend.py
        module = Qwen35(cfg, params, self.dtype)
        self._graphdef, state = nnx.split(module)
        self._state = _replicate(state, NamedSharding(mesh, REPLICATED))
        self._fns: dict = {}
        self._prefix_cache = None
        self._fingerprint = None

    # Input checks ---------------------------------------------------------------------------------
    def _as_batch(self, input_ids) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads a batch of prompts; returns (ids [B, N] int32, lengths [B])."""
        if isinstance(input_ids, (list, tuple)) and len(input_ids) == 0:
            raise ValueError("input_ids is empty: pass at least one prompt")
        if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
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
            if lo < 0 or hi >= self.cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} in prompt {i} is out of range [0, {self.cfg.vocab_size})")
        lengths = np.array([r.size for r in rows], np.int32)
        ids = np.zeros((len(rows), lengths.max()), np.int32)
        for i, r in enumerate(rows):
            ids[i, : r.size] = r
        return ids, lengths

    def _place(self, host: np.ndarray, spec) -> jax.Array:
        """Host array (the same on every process) -> global array on the mesh; works multi-process."""
        host = np.asarray(host)
        sharding = NamedSharding(self.mesh, spec)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    # Prefill --------------------------------------------------------------------------------------
    def _cache_specs(self):
        return [{"k": KV_SLOTS, "v": KV_SLOTS} if t == FULL_ATTENTION else {"conv": REPLICATED, "state": REPLICATED}
                for t in self.cfg.layer_types]

    def _alloc_fn(self, batch: int, slots: int):
        """Empty caches, allocated shard by shard: KV [B, C*slots, Hkv, hd] over `cp`, GDN replicated."""
        key = ("alloc", batch, slots)
        if key not in self._fns:
            cfg, dtype = self.cfg, self.dtype

            def per_shard():
                kv = lambda: jnp.zeros((batch, slots, cfg.num_kv_heads, cfg.head_dim), dtype)
                caches = [{"k": kv(), "v": kv()} if t == FULL_ATTENTION else _zero_gdn_state(cfg, batch, dtype)
                          for t in cfg.layer_types]
                return caches, jnp.full((batch, slots), -1, jnp.int32)

            self._fns[key] = jax.jit(jax.shard_map(per_shard, mesh=self.mesh, in_specs=(),
                                                   out_specs=(self._cache_specs(), KV_SLOTS), check_vma=False))
        return self._fns[key]

    def _prefill_fn(self, batch: int, piece: int, n_pad: int, slots: int, all_logits: bool, with_history: bool,
                    edge_logits: bool = False):
        """One prefill piece of `piece` tokens padded to n_pad (zigzag over `cp`), written into the slots
        at `offset`. A piece's padding overlaps the next piece's positions, so tokens count as real only
        below min(length, piece_start + piece). `edge_logits`: also return the logits after the piece's last
        position (what the prefix cache keeps for prompts that end there)."""
        key = ("prefill", batch, piece, n_pad, slots, all_logits, with_history, edge_logits)
        if key in self._fns:
            return self._fns[key]
        C = self.cp
        lc = n_pad // (2 * C)
        strategy = resolve_strategy(self.gdn_strategy, batch, C)
        graphdef, kernels = self._graphdef, self.kernels

        def per_shard(state, ids, lengths, piece_start, offset, caches, kpos):
            model = nnx.merge(graphdef, state)
            rank = rank_index(AXIS, C)
            pos = jnp.broadcast_to(piece_start + local_positions(rank, C, lc), ids.shape)
            ctx = ShardContext(AXIS, C, strategy, kernels, rank, pos, jnp.minimum(lengths, piece_start + piece))
            history = History(offset, offset // (2 * lc) if with_history else None, kpos)
            x, caches = model.prefill(ids, ctx, caches, history)
            kpos = jax.lax.dynamic_update_slice_in_dim(kpos, jnp.where(ctx.valid, pos, -1), offset, axis=1)
            hidden_at = lambda mask: ctx.psum(jnp.einsum("bt,btd->bd", mask.astype(x.dtype), x))
            is_last = (pos == lengths[:, None] - 1) & ctx.valid
            has_last = ctx.psum(jnp.sum(is_last, axis=1)) > 0
            edge = model.head(hidden_at((pos == piece_start + piece - 1) & ctx.valid)) if edge_logits else None
            logits = model.head(x) if all_logits else None
            return model.head(hidden_at(is_last)), has_last, edge, caches, kpos, logits

        cache_specs = self._cache_specs()
        fn = jax.shard_map(per_shard, mesh=self.mesh,
                           in_specs=(REPLICATED, TOKENS, REPLICATED, REPLICATED, REPLICATED, cache_specs, KV_SLOTS),
                           out_specs=(REPLICATED, REPLICATED, REPLICATED if edge_logits else None, cache_specs,
                                      KV_SLOTS, TOKENS if all_logits else None),
                           check_vma=False)
        self._fns[key] = jax.jit(fn, donate_argnums=(5, 6))
        return self._fns[key]

    def _run_prefill(self, input_ids, max_new_tokens: int, chunk_size: int | None, all_logits: bool):
        ids, lengths = self._as_batch(input_ids)
        B, N = ids.shape
        C = self.cp
        if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
        piece = N if chunk_size is None else min(int(chunk_size), N)
        n_pieces = -(-N // piece)
        n_pad = padded_length(piece, C)
        lc = n_pad // (2 * C)
        block = 2 * lc
        prefill_slots = n_pieces * block
        slots = prefill_slots + _decode_room(max_new_tokens, C, block)
        caches, kpos = self._alloc_fn(B, slots)()
        logits = jnp.zeros((B, self.cfg.vocab_size), jnp.float32)
        first, chain = 0, None
        if self._prefix_cache is not None:
            chain = self._prefix_cache.chain(self, ids, lengths, piece, n_pad)
            first, restored = self._prefix_cache.restore(self, chain, piece, n_pad, caches, kpos)
            if first:
                caches, kpos, logits = restored
        all_out = []
        for p in range(first, n_pieces):
            chunk = np.zeros((B, n_pad), np.int32)
            part = ids[:, p * piece:(p + 1) * piece]
            chunk[:, : part.shape[1]] = part
            fn = self._prefill_fn(B, piece, n_pad, slots, all_logits, with_history=p > 0,
                                  edge_logits=self._prefix_cache is not None)
            last, has_last, edge_logits, caches, kpos, piece_logits = fn(
                self._state, self._place(chunk[:, token_permutation(n_pad, C)], TOKENS),
                self._place(lengths, REPLICATED), self._place(np.int32(p * piece), REPLICATED),
                self._place(np.int32(p * block), REPLICATED), caches, kpos)
            logits = jnp.where(has_last[:, None], last, logits)
            if all_logits:
                all_out.append((piece_logits, part.shape[1]))
            if self._prefix_cache is not None:
                self._prefix_cache.store(self, chain, n_pad, p, caches, kpos, edge_logits)
        result = PrefillResult(logits, lengths, caches, kpos, slots, prefill_slots)
        return result, all_out

    def prefill(self, input_ids, *, max_new_tokens: int = 0, chunk_size: int | None = None) -> PrefillResult:
        """Prefill prompts (a right-padded [B, N] array or a list of prompts) across `cp`. With
        `chunk_size=S` the prompt is fed in pieces of S tokens, each zigzag-sharded over `cp` and attending
        to the KV cached by the earlier pieces: activation memory follows S, not the prompt length.
        Returns next-token logits and caches with room for `max_new_tokens` decode steps."""
        return self._run_prefill(input_ids, max_new_tokens, chunk_size, all_logits=False)[0]

    def logits(self, input_ids, *, chunk_size: int | None = None) -> np.ndarray:
        """Full-sequence scoring: np.ndarray [B, N, V] float32 (rows shorter than N are padded; their
        logits past their length are meaningless)."""
        _, pieces = self._run_prefill(input_ids, 0, chunk_size, all_logits=True)
        out = []
        for piece_logits, n in pieces:
            host = to_host(piece_logits)
            out.append(host[:, np.argsort(token_permutation(host.shape[1], self.cp))][:, :n])
        return np.concatenate(out, axis=1)

    # Prefix cache ---------------------------------------------------------------------------------
    def enable_prefix_cache(self, max_bytes: int | None = None, *, cache=None):
        """Keep the KV blocks and GDN states at the end of every prefill piece (within `max_bytes`, LRU),
        so a later prompt sharing a prefix restores the longest cached boundary and prefills only the rest.
        Or pass `cache=` an existing `PrefixCache` to share it between models: entries are keyed by the
        model's weights, dtype, cp layout and piece size, so they never cross."""
        from pcp_jax.prefix_cache import PrefixCache
        if (max_bytes is None) == (cache is None):
            raise ValueError("give exactly one of max_bytes (a new cache) or cache= (a shared PrefixCache)")
        self._prefix_cache = cache if cache is not None else PrefixCache(max_bytes)
        return self._prefix_cache

    def fingerprint(self) -> bytes:
        """A digest of the config and the weights (per-tensor sums), for keys that must not cross models."""
        if self._fingerprint is None:
            import hashlib
            sums = jax.jit(lambda st: jnp.stack([jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(st)]))
            digest = hashlib.sha256(repr(self.cfg).encode())
            digest.update(to_host(sums(self._state)).tobytes())
            self._fingerprint = digest.digest()
        return self._fingerprint

    def _slot_block_fn(self, block: int, slots: int):
        """Copy out `block` slots at a slot offset from every rank's KV shard (and their positions)."""
        key = ("slot_block", block, slots)
        if key not in self._fns:
            n_attn = len(self.cfg.attention_layers)

            def per_shard(kv, kpos, offset):
                take = lambda a: jax.lax.dynamic_slice_in_dim(a, offset, block, axis=1)
                return jax.tree.map(take, kv), take(kpos)

            kv_spec = [{"k": KV_SLOTS, "v": KV_SLOTS}] * n_attn
            self._fns[key] = jax.jit(jax.shard_map(per_shard, mesh=self.mesh, in_specs=(kv_spec, KV_SLOTS, REPLICATED),
                                                   out_specs=(kv_spec, KV_SLOTS), check_vma=False))
        return self._fns[key]

    def _slot_restore_fn(self, block: int, slots: int):
        """Write a block taken by `_slot_block_fn` back at a slot offset of every rank's KV shard."""
        key = ("slot_restore", block, slots)
        if key not in self._fns:
            n_attn = len(self.cfg.attention_layers)

            def per_shard(kv, kpos, kv_block, kpos_block, offset):
                put = lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, offset, axis=1)
                return jax.tree.map(put, kv, kv_block), put(kpos, kpos_block)

            kv_spec = [{"k": KV_SLOTS, "v": KV_SLOTS}] * n_attn
            self._fns[key] = jax.jit(
                jax.shard_map(per_shard, mesh=self.mesh,
                              in_specs=(kv_spec, KV_SLOTS, kv_spec, KV_SLOTS, REPLICATED),
                              out_specs=(kv_spec, KV_SLOTS), check_vma=False), donate_argnums=(0, 1))
        return self._fns[key]

    def prefix_cache_stats(self) -> dict:
        if self._prefix_cache is None:
            raise ValueError("the prefix cache is not enabled: call model.enable_prefix_cache(max_bytes) first")
        return self._prefix_cache.stats()

    # Decode ---------------------------------------------------------------------------------------
    def _decode_fn(self, batch: int, slots: int):
        key = ("decode", batch, slots)
        if key in self._fns:
            return self._fns[key]
        C, graphdef, kernels = self.cp, self._graphdef, self.kernels
        cache_specs = self._cache_specs()

        def per_shard(state, tokens, positions, caches, kpos, owner, slot):
            model = nnx.merge(graphdef, state)
            rank = rank_index(AXIS, C)
            ctx = ShardContext(AXIS, C, "sequence", kernels, rank, positions[:, None], positions + 1)
            kpos = _write_slot(kpos, positions[:, None], ctx, (owner, slot))
            logits, caches = model.decode(tokens[:, None], ctx, caches, kpos, (owner, slot))
            return logits, caches, kpos

        fn = jax.shard_map(per_shard, mesh=self.mesh,
                           in_specs=(REPLICATED, REPLICATED, REPLICATED, cache_specs, KV_SLOTS, REPLICATED, REPLICATED),
                           out_specs=(REPLICATED, cache_specs, KV_SLOTS), check_vma=False)
        self._fns[key] = jax.jit(fn, donate_argnums=(3, 4))
        return self._fns[key]

    def decode_step(self, state: PrefillResult, tokens, step: int) -> jax.Array:
        """Feed one token per row (decode step `step`, 0-based after prefill); updates `state` in place
        and returns next-token logits [B, V] fp32."""
        C = self.cp
        slot = state.prefill_slots + step // C
        if slot >= state.slots_per_rank:
            raise ValueError(f"decode step {step} exceeds the cache: prefill reserved room for "
                             f"{(state.slots_per_rank - state.prefill_slots) * C} new tokens (max_new_tokens)")
        positions = (state.lengths + step).astype(np.int32)
        fn = self._decode_fn(len(state.lengths), state.slots_per_rank)
        logits, state.caches, state.kpos = fn(
            self._state, self._place(np.asarray(tokens, np.int32), REPLICATED), self._place(positions, REPLICATED),
            state.caches, state.kpos, self._place(np.int32(step % C), REPLICATED), self._place(np.int32(slot), REPLICATED))
        state.logits = logits
        return logits

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
                 callback: Callable[[int, np.ndarray], None] | None = None,
                 chunk_size: int | None = None) -> np.ndarray:
        """Prompts + `max_new_tokens` tokens: np.ndarray [B, N + max_new_tokens] int32 (greedy at
        temperature 0). Rows of a ragged batch are right-aligned to their own length in the output:
        row b holds its prompt, then its new tokens, then EOS padding (or 0 without EOS). Rows that hit
        EOS are padded with EOS. `callback(step, tokens[B])` sees each new token as it is made.
        `chunk_size` feeds the prompt in pieces (see `prefill`)."""
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        ids, lengths = self._as_batch(input_ids)
        eos = _eos_set(eos_token_id)
        B = len(lengths)
        out = np.zeros((B, ids.shape[1] + max_new_tokens), np.int32)
        fill = min(eos) if eos else 0
        for b in range(B):
            out[b, : lengths[b]] = ids[b, : lengths[b]]
            out[b, lengths[b]:] = fill
        if max_new_tokens == 0:
            return out
        state = self.prefill([ids[b, : lengths[b]] for b in range(B)], max_new_tokens=max_new_tokens,
                             chunk_size=chunk_size)
        done = np.zeros(B, bool)
        logits = state.logits
        for step in range(max_new_tokens):
            tok = to_host(_sample(logits, jax.random.fold_in(jax.random.key(seed), step),
                                     float(temperature), top_k, top_p))
            tok = np.where(done, fill, tok)
            out[np.arange(B), lengths + step] = tok
            if callback is not None:
                callback(step, tok.copy())
            done |= np.isin(tok, list(eos)) if eos else False
            if done.all() or step + 1 == max_new_tokens:
                break
            logits = self.decode_step(state, tok, step)
        return out


def _decode_room(max_new_tokens: int, cp: int, block: int) -> int:
    """KV slots per rank reserved after the prompt for `max_new_tokens` (round-robin: ceil(n / cp) each).
    Rounded up to a power of two (at least 256, at most one prefill block) so that nearby values of
    max_new_tokens share one compiled prefill and decode program; the waste is under 2x of the decode room,
    never a prompt's worth (rounding to a whole block once doubled a long prompt's KV cache)."""
    room = -(-max(int(max_new_tokens), 0) // cp)
    if room == 0:
        return 0
    pow2 = max(256, 1 << (room - 1).bit_length())
    whole_blocks = -(-room // block) * block
    return min(pow2, whole_blocks)


def _replicate(tree, sharding: NamedSharding):
    """Every leaf on every device of a replicated `sharding`. Across processes each process copies its
    own (identical) leaves onto its local devices: `jax.device_put` would instead compare every leaf
    across processes first (a process_allgather of the whole model). Leaves that are already global
    (e.g. restored from Orbax onto this mesh) are resharded, not copied through the host."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    local = sorted(sharding.addressable_devices, key=lambda d: d.id)

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_single_device_arrays(np.shape(x), sharding, [jax.device_put(x, d) for d in local])

    return jax.tree.map(leaf, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathers across processes when needed)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _eos_set(eos):
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, (int, np.integer)) else {int(e) for e in eos}


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample(logits, key, temperature, top_k, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # smallest set whose mass reaches top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _zero_gdn_state(cfg: ModelConfig, batch: int, dtype):
    return {"conv": jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
            "state": jnp.zeros((batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                cfg.linear_value_head_dim), jnp.float32)}

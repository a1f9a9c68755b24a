"""The user-facing model: prefill, full-sequence logits and generation over a `cp` x `tp` mesh.

Everything runs in one `shard_map` over the mesh axes `cp` and `tp` (weights split over `tp`:
pcp_jax/parallel/tensor.py; tokens over `cp`): prompts are padded to a bucket of the length
ladder (pcp_jax.buckets), put in zigzag order and split over `cp` (pcp_jax.parallel.zigzag). The exact
length is a traced input, so a session compiles one program per bucket, not per length; long prompts go
in pieces (`chunk_size="auto"`: sized from a memory budget), and `Model.warmup` compiles every program a
range of prompt lengths needs, ahead of time. The KV cache of full-attention layers stays where prefill
left it: each rank holds its own tokens' K/V plus a share of the decode slots (new tokens go round-robin:
decode step j writes on rank j mod C, at slot prefill_slots + j div C). GDN conv and recurrent states are
small and replicated over `cp` (split by heads over `tp`, like the KV cache). No rank ever holds the whole KV
cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pcp_jax import compile_cache
from pcp_jax.buckets import STEPS, Pieces, capacity, decode_room, plan_pieces
from pcp_jax.config import ModelConfig, _is_int
from pcp_jax.kernels import KERNEL_CHOICES
from pcp_jax.kernels.attention.api import DECODE_METHODS
from pcp_jax.kernels.backend import preload_gpu_backends, use_gpu_kernels
from pcp_jax.memory import DTYPES, auto_piece_tokens, default_prefill_budget, device_memory_stats, kv_bytes_per_token
from pcp_jax.model import History, LayerPlan, Qwen35, _write_slot, empty_caches
from pcp_jax.parallel.context import ShardContext
from pcp_jax.parallel.tensor import DictSource, check_tp, local_config, mesh_config, place_params
from pcp_jax.parallel.gdn_cp import resolve_strategy
from pcp_jax.parallel.zigzag import local_positions, rank_index, token_permutation
from pcp_jax.sharding import CACHES, KV_SLOTS, REPLICATED, STACKED_KV, TOKENS
from pcp_jax.sharding import CP_AXIS as AXIS
from pcp_jax.sharding import TP_AXIS, make_mesh, with_tp_axis


@dataclasses.dataclass
class PrefillResult:
    """What prefill leaves behind: next-token logits and the (sharded) caches to decode from."""
    logits: jax.Array          # [B, V] fp32, logits after each row's last prompt token
    lengths: np.ndarray        # [B] prompt lengths
    caches: dict               # stacked (model.empty_caches): "k"/"v" [NA, B, C*S, Hkv, hd] sharded on slots
                               # (cp) and heads (tp), "conv"/"state" [NG, B, ...] on channels/heads (tp)
    kpos: jax.Array            # [B, C*S] positions held by each KV slot (-1 empty), sharded like K/V
    slots_per_rank: int        # S (the cache capacity, a ladder value)
    prefill_slots: int         # slots per rank written by prefill; decode appends after them


class Model:
    """A Qwen3.5 model placed on a `cp` x `tp` mesh. Build it with `pcp_jax.load_model` or
    `Model(cfg, params, cp=C, tp=T)`: `params` is the flat checkpoint contract {name: array} or a
    `TensorSource` (pcp_jax.parallel.tensor: names/shape/read of contract tensors), from which each device
    reads only the blocks it holds.

    `prefill_budget_bytes`: activation memory per device that one prefill piece may use; with
    `chunk_size="auto"` (the default) longer prompts go in pieces. Default: 40% of the device memory
    left after the weights where the backend reports it, else 2 GiB. `scan_decode`: run decode's layer
    groups as a loop (one compiled body) or, by default, unrolled: a scanned decode step reads each
    layer's weights through a dynamic slice that XLA copies, which made the 9B step 1.6x slower on an
    H200 (14.7 vs 9.1 ms at 8k context; docs/BENCHMARKS.md). `bucket_steps`: padded lengths per doubling of the length ladder (pcp_jax.buckets;
    fewer: fewer programs to warm up, more padding); None pads prompts only to a multiple of 2·C·64 tokens
    (the least padding, but a program per length). `compile_cache_dir`: JAX's persistent compilation cache
    folder, "off", or None for the default (pcp_jax.compile_cache). `weights_digest`: a digest of the
    weights already known (stored at conversion), so `fingerprint` need not hash them.
    `consume_params`: empty `params` while building (each tensor leaves the dict once its device copies are
    made), so that no weight is held twice at load; without it the caller's arrays stay alive until the
    caller drops them. `decode_attention`: how decode attends to the KV cache (a method of
    pcp_jax.kernels.attention.api.decode_attention_stacked: "dense", "split", "split-sum", "pallas"), or
    "auto": "pallas" where `kernels` runs GPU kernels (it reads each layer's filled cache blocks in place:
    9B generate at 128k context 9.59 -> 6.63 ms/token on an H200, docs/BENCHMARKS.md), else "dense". The
    attribute of that name holds the method chosen and may be changed between calls (each method is its
    own decode program)."""

    def __init__(self, cfg: ModelConfig, params, *, cp: int = 1, tp: int = 1, mesh: Mesh | None = None,
                 dtype: str = "bfloat16", kernels: str = "auto", gdn_strategy: str = "auto",
                 prefill_budget_bytes: int | None = None, scan_decode: bool = False, bucket_steps: int | None = STEPS,
                 compile_cache_dir=None, weights_digest: bytes | None = None, consume_params: bool = False,
                 decode_attention: str = "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}; expected one of {list(KERNEL_CHOICES)}")
        if prefill_budget_bytes is not None and not (_is_int(prefill_budget_bytes) and prefill_budget_bytes > 0):
            raise ValueError(f"prefill_budget_bytes={prefill_budget_bytes!r} must be a positive integer")
        resolve_strategy(gdn_strategy, 0, 1)  # validates the name
        if mesh is None:
            mesh = make_mesh(cp, tp)
        else:
            mesh = with_tp_axis(mesh)
            for name, v in (("cp", cp), ("tp", tp)):
                if v not in (1, mesh.shape[name]):
                    raise ValueError(f"{name}={v} disagrees with the mesh's {name!r} axis of size {mesh.shape[name]}")
        check_tp(cfg, mesh.shape[TP_AXIS])
        compile_cache.enable(compile_cache_dir)
        self.cfg, self.mesh, self.dtype_name = cfg, mesh, dtype
        self.cp, self.tp = mesh.shape[AXIS], mesh.shape[TP_AXIS]
        self.kernels, self.gdn_strategy = kernels, gdn_strategy
        self.dtype = DTYPES[dtype]
        self.scan_decode = bool(scan_decode)
        if decode_attention not in ("auto", *DECODE_METHODS):
            raise ValueError(f"decode_attention={decode_attention!r}; expected one of "
                             f"{['auto', *DECODE_METHODS]}")
        if decode_attention == "auto":
            decode_attention = "pallas" if use_gpu_kernels(kernels) else "dense"
        self.decode_attention = decode_attention
        if bucket_steps is not None and not (_is_int(bucket_steps) and bucket_steps >= 1
                                             and not bucket_steps & (bucket_steps - 1)):
            raise ValueError(f"bucket_steps={bucket_steps!r} must be a power of two (lengths per doubling) or None")
        self.bucket_steps = bucket_steps
        self._weights_digest = weights_digest
        preload_gpu_backends(kernels)  # before any trace: see kernels/backend.py
        plan = LayerPlan.of(cfg.layer_types)
        source = DictSource(params, consume=consume_params) if isinstance(params, dict) else params
        placed = place_params(cfg, mesh, source, self.dtype, plan.period, plan.groups)
        self._graphdef, self._state = nnx.split(Qwen35(cfg, placed, self.dtype, self.tp))
        del placed
        self._state_specs = jax.tree.map(lambda a: a.sharding.spec, self._state)
        self._fns: dict = {}
        self._prefix_cache = None
        self._fingerprint = None
        self._room_floor = 0  # decode slots every prefill reserves at least (set by warmup)
        if prefill_budget_bytes is None:  # 40% of what the weights left free (pcp_jax.memory)
            stats = device_memory_stats(mesh) or {}
            prefill_budget_bytes = default_prefill_budget(stats.get("bytes_in_use", 0), stats.get("bytes_limit"))
        self.prefill_budget_bytes = prefill_budget_bytes
        self.auto_piece_tokens = auto_piece_tokens(cfg, self.cp, jnp.dtype(self.dtype).itemsize, prefill_budget_bytes,
                                                   tp=self.tp)

    def _tp_fields(self) -> tuple:
        """(tp, tp_axis, tp_rank) of a ShardContext, inside the shard_map."""
        return self.tp, TP_AXIS, jax.lax.axis_index(TP_AXIS) if self.tp > 1 else 0

    def _free_device_bytes(self) -> int | None:
        """Free memory of one of this process's devices in the mesh (None where the backend does not say)."""
        stats = device_memory_stats(self.mesh)
        return None if stats is None else stats["bytes_limit"] - stats.get("bytes_in_use", 0)

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
    def _alloc_fn(self, batch: int, slots: int):
        """Empty stacked caches (model.empty_caches), allocated shard by shard: KV [NA, B, C*slots, Hkv, hd]
        over `cp` (heads over `tp`), GDN states replicated over `cp`; and the slot positions [B, C*slots]
        (-1: empty)."""
        key = ("alloc", batch, slots)
        if key not in self._fns:
            cfg, dtype = local_config(self.cfg, self.tp), self.dtype

            def per_shard():
                return empty_caches(cfg, batch, slots, dtype), jnp.full((batch, slots), -1, jnp.int32)

            self._fns[key] = jax.jit(jax.shard_map(per_shard, mesh=self.mesh, in_specs=(),
                                                   out_specs=(CACHES, KV_SLOTS), check_vma=False))
        return self._fns[key]

    def _prefill_fn(self, batch: int, n_pad: int, slots: int, all_logits: bool, with_history: bool):
        """One prefill piece padded to n_pad tokens (zigzag over `cp`), written into the slots at `offset`.
        The piece's start and length are traced, so every prompt whose pieces pad to n_pad shares this
        program. A piece's padding overlaps the next piece's positions, so tokens count as real only below
        min(length, piece_start + piece_len). Returns the next-token logits (rows whose last token is not
        in this piece keep `logits`), the logits after the piece's last position (what the prefix cache
        keeps for prompts that end there), the caches and slot positions, and with `all_logits` the logits
        of every local token."""
        key = ("prefill", batch, n_pad, slots, all_logits, with_history)
        if key in self._fns:
            return self._fns[key]
        C = self.cp
        lc = n_pad // (2 * C)
        strategy = resolve_strategy(self.gdn_strategy, batch, C)
        graphdef, kernels = self._graphdef, self.kernels

        def per_shard(state, ids, lengths, piece_start, piece_len, offset, logits, caches, kpos):
            model = nnx.merge(graphdef, state)
            rank = rank_index(AXIS, C)
            pos = jnp.broadcast_to(piece_start + local_positions(rank, C, lc), ids.shape)
            ctx = ShardContext(AXIS, C, strategy, kernels, rank, pos, jnp.minimum(lengths, piece_start + piece_len),
                               *self._tp_fields())
            history = History(offset, offset // (2 * lc) if with_history else None, kpos)
            x, caches = model.prefill(ids, ctx, caches, history)
            kpos = jax.lax.dynamic_update_slice_in_dim(kpos, jnp.where(ctx.valid, pos, -1), offset, axis=1)
            hidden_at = lambda mask: ctx.psum(jnp.einsum("bt,btd->bd", mask.astype(x.dtype), x))
            is_last = (pos == lengths[:, None] - 1) & ctx.valid
            has_last = ctx.psum(jnp.sum(is_last, axis=1)) > 0
            logits = jnp.where(has_last[:, None], model.head(hidden_at(is_last), ctx), logits)
            edge = model.head(hidden_at((pos == piece_start + piece_len - 1) & ctx.valid), ctx)
            every = model.head(x, ctx) if all_logits else None
            return logits, edge, caches, kpos, every

        fn = jax.shard_map(per_shard, mesh=self.mesh,
                           in_specs=(self._state_specs, TOKENS, REPLICATED, REPLICATED, REPLICATED, REPLICATED,
                                     REPLICATED, CACHES, KV_SLOTS),
                           out_specs=(REPLICATED, REPLICATED, CACHES, KV_SLOTS, TOKENS if all_logits else None),
                           check_vma=False)
        self._fns[key] = jax.jit(fn, donate_argnums=(7, 8))  # not `logits`: it may be a prefix-cache entry's
        return self._fns[key]

    def _pieces(self, n: int, chunk_size) -> Pieces:
        if not (chunk_size is None or chunk_size == "auto"
                or (_is_int(chunk_size) and chunk_size >= 1)):
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer, 'auto' or None")
        return plan_pieces(n, self.cp, chunk_size, self.auto_piece_tokens, fixed=self._prefix_cache is not None,
                           steps=self.bucket_steps)

    def _slots(self, pieces: Pieces, max_new_tokens: int) -> tuple[int, int]:
        """(prefill slots, cache capacity) per rank for a prompt fed as `pieces`."""
        prefill_slots = pieces.count * (pieces.n_pad // self.cp)
        return prefill_slots, capacity(prefill_slots + max(decode_room(max_new_tokens, self.cp), self._room_floor))

    def _check_request(self, batch: int, n: int, max_new_tokens: int, slots: int) -> None:
        """Refuse, before allocating anything, a request beyond the model's positions or the device memory."""
        limit = self.cfg.max_position_embeddings
        if limit and n + max_new_tokens > limit:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"{limit} positions (max_position_embeddings)")
        kv = kv_bytes_per_token(self.cfg, 1, jnp.dtype(self.dtype).itemsize, tp=self.tp) * batch * slots  # slots: per rank
        free, where = self._free_device_bytes(), "per device"
        if free is None and self.mesh.devices.flat[0].platform == "cpu":
            # CPU devices share the host's memory: refuse what cannot fit in all of it (what is free right
            # now would refuse requests the page cache could make room for)
            free, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // self.mesh.size, "per CPU device (host memory)"
        if free is not None and kv > free:
            hint = "" if "host memory" in where else (
                "; JAX takes XLA_PYTHON_CLIENT_MEM_FRACTION of each GPU (0.75 unless set): a model that fills most of "
                "a GPU may need e.g. 0.95")
            raise ValueError(f"the KV cache for {n} prompt tokens + {max_new_tokens} new tokens x batch {batch} needs "
                             f"{kv / 2**30:.1f} GiB {where}; {free / 2**30:.1f} GiB are available (use a larger cp or tp, "
                             f"fewer tokens or a smaller batch{hint})")

    def _run_prefill(self, input_ids, max_new_tokens: int, chunk_size, all_logits: bool):
        ids, lengths = self._as_batch(input_ids)
        B, N = ids.shape
        C = self.cp
        pieces = self._pieces(N, chunk_size)
        block = pieces.n_pad // C
        prefill_slots, slots = self._slots(pieces, max_new_tokens)
        self._check_request(B, N, max_new_tokens, slots)
        caches, kpos = self._alloc_fn(B, slots)()
        logits = self._place(np.zeros((B, self.cfg.vocab_size), np.float32), REPLICATED)
        # Full-sequence logits need every piece's activations, which the prefix cache does not keep: they
        # bypass it (neither restored nor stored).
        prefix_cache = None if all_logits else self._prefix_cache
        first, chain = 0, None
        if prefix_cache is not None:
            chain = prefix_cache.chain(self, ids, lengths, pieces.tokens, pieces.n_pad)
            first, restored = prefix_cache.restore(self, chain, pieces.tokens, pieces.n_pad, caches, kpos)
            if first:
                caches, kpos, logits = restored
        all_out = []
        perm = token_permutation(pieces.n_pad, C)
        for p in range(first, pieces.count):
            chunk = np.zeros((B, pieces.n_pad), np.int32)
            part = ids[:, p * pieces.tokens:(p + 1) * pieces.tokens]
            chunk[:, : part.shape[1]] = part
            fn = self._prefill_fn(B, pieces.n_pad, slots, all_logits, with_history=p > 0)
            scalar = lambda v: self._place(np.int32(v), REPLICATED)
            logits, edge_logits, caches, kpos, piece_logits = fn(
                self._state, self._place(chunk[:, perm], TOKENS), self._place(lengths, REPLICATED),
                scalar(p * pieces.tokens), scalar(pieces.tokens), scalar(p * block), logits, caches, kpos)
            if all_logits:
                all_out.append((piece_logits, part.shape[1]))
            if prefix_cache is not None:
                prefix_cache.store(self, chain, pieces.n_pad, p, caches, kpos, edge_logits)
        result = PrefillResult(logits, lengths, caches, kpos, slots, prefill_slots)
        return result, all_out

    def prefill(self, input_ids, *, max_new_tokens: int = 0, chunk_size: int | str | None = "auto") -> PrefillResult:
        """Prefill prompts (a right-padded [B, N] array or a list of prompts) across `cp`. The prompt is
        fed in pieces, each zigzag-sharded over `cp` and attending to the KV cached by the earlier pieces,
        so activation memory follows the piece, not the prompt: `chunk_size="auto"` (default) uses one
        piece up to `auto_piece_tokens` and equal pieces above it, an int S pieces of S tokens, None one
        piece. Returns next-token logits and caches with room for `max_new_tokens` decode steps."""
        if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        return self._run_prefill(input_ids, max_new_tokens, chunk_size, all_logits=False)[0]

    def logits(self, input_ids, *, chunk_size: int | str | None = "auto") -> np.ndarray:
        """Full-sequence scoring: np.ndarray [B, N, V] float32 (rows shorter than N are padded; their
        logits past their length are meaningless). Never served from the prefix cache."""
        _, pieces = self._run_prefill(input_ids, 0, chunk_size, all_logits=True)
        out = []
        for piece_logits, n in pieces:
            host = to_host(piece_logits)
            out.append(host[:, np.argsort(token_permutation(host.shape[1], self.cp))][:, :n])
        return np.concatenate(out, axis=1)

    def memory_report(self, budget_bytes: int | None = None) -> dict:
        """Bytes per device of the weights, the KV cache per prompt token, the GDN state per sequence and one
        prefill piece's activations, and the longest prompt that fits `budget_bytes` per device (default:
        the device's memory limit where the backend reports it). Keys and units: pcp_jax.memory;
        `pcp_jax.memory.format_memory_report` prints it."""
        from pcp_jax import memory
        return memory.memory_report(self, budget_bytes)

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
        """A collision-resistant key of the config and the weights, for keys that must not cross models:
        sha256 of the config and of the weights' digest (the one stored at conversion when loaded from a
        converted folder, else a sha256 of every weight's name, dtype, shape and bytes, computed here once,
        one tensor at a time, on first use)."""
        if self._fingerprint is None:
            import hashlib

            from pcp_jax.loading import weights_digest
            # Every distinct block this process holds (a replicated leaf is one block, named by its path
            # alone), each a device array copied to the host only while it is hashed.
            weights = self._weights_digest or weights_digest(_distinct_blocks(self._state))
            self._fingerprint = hashlib.sha256(repr(self.cfg).encode() + weights).digest()
        return self._fingerprint

    def _slot_block_fn(self, block: int, slots: int):
        """Copy out `block` slots at a slot offset from every rank's KV shard of every attention layer
        (and their positions)."""
        key = ("slot_block", block, slots)
        if key not in self._fns:
            def per_shard(k, v, kpos, offset):
                take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, offset, block, axis=axis)
                return take(k, 2), take(v, 2), take(kpos, 1)

            self._fns[key] = jax.jit(jax.shard_map(
                per_shard, mesh=self.mesh, in_specs=(STACKED_KV, STACKED_KV, KV_SLOTS, REPLICATED),
                out_specs=(STACKED_KV, STACKED_KV, KV_SLOTS), check_vma=False))
        return self._fns[key]

    def _slot_restore_fn(self, block: int, slots: int):
        """Write a block taken by `_slot_block_fn` back at a slot offset of every rank's KV shard."""
        key = ("slot_restore", block, slots)
        if key not in self._fns:
            def per_shard(k, v, kpos, k_block, v_block, kpos_block, offset):
                put = lambda a, b, axis: jax.lax.dynamic_update_slice_in_dim(a, b, offset, axis=axis)
                return put(k, k_block, 2), put(v, v_block, 2), put(kpos, kpos_block, 1)

            specs = (STACKED_KV, STACKED_KV, KV_SLOTS)
            self._fns[key] = jax.jit(
                jax.shard_map(per_shard, mesh=self.mesh, in_specs=specs + specs + (REPLICATED,),
                              out_specs=specs, check_vma=False), donate_argnums=(0, 1, 2))
        return self._fns[key]

    def prefix_cache_stats(self) -> dict:
        if self._prefix_cache is None:
            raise ValueError("the prefix cache is not enabled: call model.enable_prefix_cache(max_bytes) first")
        return self._prefix_cache.stats()

    # Decode ---------------------------------------------------------------------------------------
    def _decode_fn(self, batch: int, slots: int, attention: str):
        """One decode step: (state, packed, caches, kpos) -> (logits [B, V] fp32, caches, kpos), caches and
        kpos donated. packed [2B + 2] int32 = tokens [B], positions [B], owner rank, slot: one host-to-device
        transfer per step instead of four."""
        key = ("decode", batch, slots, attention)
        if key in self._fns:
            return self._fns[key]
        C, graphdef, kernels = self.cp, self._graphdef, self.kernels
        scan = self.scan_decode

        def per_shard(state, packed, caches, kpos):
            tokens, positions, owner, slot = packed[:batch], packed[batch:2 * batch], packed[2 * batch], packed[-1]
            model = nnx.merge(graphdef, state)
            rank = rank_index(AXIS, C)
            ctx = ShardContext(AXIS, C, "sequence", kernels, rank, positions[:, None], positions + 1, *self._tp_fields())
            kpos = _write_slot(kpos, positions[:, None], ctx, (owner, slot))
            logits, caches = model.decode(tokens[:, None], ctx, caches, kpos, (owner, slot), scan=scan,
                                          attention=attention)
            return logits, caches, kpos

        fn = jax.shard_map(per_shard, mesh=self.mesh, in_specs=(self._state_specs, REPLICATED, CACHES, KV_SLOTS),
                           out_specs=(REPLICATED, CACHES, KV_SLOTS), check_vma=False)
        self._fns[key] = jax.jit(fn, donate_argnums=(2, 3))
        return self._fns[key]

    def decode_step(self, state: PrefillResult, tokens, step: int) -> jax.Array:
        """Feed one token per row (decode step `step`, 0-based after prefill); updates `state` in place
        and returns next-token logits [B, V] fp32."""
        B = len(state.lengths)
        where = self._decode_where(state, step)
        tokens = np.asarray(tokens)
        if tokens.shape != (B,) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be {B} integer token ids (one per row); got shape {tokens.shape}, "
                             f"dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
            raise ValueError(f"token id {bad} is out of range [0, {self.cfg.vocab_size})")
        packed = np.concatenate([tokens.astype(np.int32), where])
        return self._decode_packed(state, self._place(packed, REPLICATED))

    def _decode_where(self, state: PrefillResult, step: int) -> np.ndarray:
        """Where decode step `step` writes: [B + 2] int32 = positions [B], owner rank, slot (checked
        against the room prefill reserved)."""
        C = self.cp
        if not (_is_int(step) and step >= 0):
            raise ValueError(f"step={step!r} must be a non-negative integer (0 for the first token after prefill)")
        slot = state.prefill_slots + step // C
        if slot >= state.slots_per_rank:
            raise ValueError(f"decode step {step} exceeds the cache: prefill reserved room for "
                             f"{(state.slots_per_rank - state.prefill_slots) * C} new tokens (max_new_tokens)")
        return np.concatenate([(state.lengths + step).astype(np.int32), np.array([step % C, slot], np.int32)])

    def _decode_packed(self, state: PrefillResult, packed: jax.Array) -> jax.Array:
        """The decode step on a device array packed [2B + 2] int32 (see `_decode_fn`)."""
        fn = self._decode_fn(len(state.lengths), state.slots_per_rank, self.decode_attention)
        logits, state.caches, state.kpos = fn(self._state, packed, state.caches, state.kpos)
        state.logits = logits
        return logits

    def _sampling_settings(self, temperature: float, top_k: int | None, top_p: float | None):
        """(temperature, top_k, top_p) as replicated device scalars: the traced arguments of `_sample_fn`."""
        return tuple(self._place(np.asarray(v, t), REPLICATED) for v, t in
                     ((temperature, np.float32), (top_k or self.cfg.vocab_size, np.int32), (top_p or 1.0, np.float32)))

    def _sample_fn(self, greedy: bool):
        """(logits [B, V], key, temperature, top_k, top_p, feed [2B + 3] int32) -> (tokens [B], packed
        [2B + 2]), both replicated on the mesh. feed = per row the id to feed instead of the sampled one
        (>= 0: the row is finished) or -1, then `_decode_where`'s positions, owner and slot, then the step
        (it seeds sampling). packed is the next decode step's input, made on the device so that the step
        can be queued before the host has seen the sampled tokens."""
        key = ("sample", greedy)
        if key not in self._fns:
            def sample_and_pack(logits, rng, temperature, top_k, top_p, feed):
                B = logits.shape[0]
                tokens = _sample(logits, rng, feed[-1], temperature, top_k, top_p, greedy=greedy)
                fed = jnp.where(feed[:B] >= 0, feed[:B], tokens)
                return tokens, jnp.concatenate([fed, feed[B:-1]])

            out = NamedSharding(self.mesh, REPLICATED)
            self._fns[key] = jax.jit(sample_and_pack, out_shardings=(out, out))
        return self._fns[key]

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
                 callback: Callable[[int, np.ndarray], None] | None = None,
                 chunk_size: int | str | None = "auto") -> np.ndarray:
        """Prompts + `max_new_tokens` tokens: np.ndarray [B, N + max_new_tokens] int32 (greedy at
        temperature 0). Rows of a ragged batch are right-aligned to their own length in the output:
        row b holds its prompt, then its new tokens, then EOS padding (or 0 without EOS). Rows that hit
        EOS are padded with EOS. `callback(step, tokens[B])` sees each new token as it is made.
        `chunk_size` feeds the prompt in pieces (see `prefill`).

        Each step's decode is queued on the device before the host waits for that step's sampled tokens
        (they are fed from device memory), so the host's bookkeeping and the next dispatch overlap the
        device's work. When every row has stopped at EOS, the one decode step already queued is wasted."""
        if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        temperature, top_k, top_p, seed = _sampling_args(temperature, top_k, top_p, seed, self.cfg.vocab_size)
        ids, lengths = self._as_batch(input_ids)
        eos = _eos_set(eos_token_id, self.cfg.vocab_size)
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
        new = self._decode_loop(state, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, eos=eos, callback=callback)
        for b in range(B):
            out[b, lengths[b]: lengths[b] + max_new_tokens] = new[b]
        return out

    def decode(self, state: PrefillResult, max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               eos_token_id: int | Sequence[int] | None = None,
               callback: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """`max_new_tokens` new tokens per row after a prefill's result `state` (made with room for them:
        `prefill(..., max_new_tokens=...)`), which is updated in place: np.ndarray [B, max_new_tokens] int32.
        `generate` is `prefill` then this; call it yourself to keep the prefill's next-token logits
        (`state.logits`) beside the tokens without a second prefill. Sampling and EOS as in `generate`."""
        if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        room = (state.slots_per_rank - state.prefill_slots) * self.cp
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the room this prefill reserved for "
                             f"{room} new tokens (prefill(..., max_new_tokens=...))")
        temperature, top_k, top_p, seed = _sampling_args(temperature, top_k, top_p, seed, self.cfg.vocab_size)
        eos = _eos_set(eos_token_id, self.cfg.vocab_size)
        if max_new_tokens == 0:
            return np.zeros((len(state.lengths), 0), np.int32)
        return self._decode_loop(state, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed, eos=eos, callback=callback)

    def _decode_loop(self, state: PrefillResult, max_new_tokens: int, *, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                     eos: set[int] = frozenset(), callback=None) -> np.ndarray:
        """`max_new_tokens` >= 1 new tokens per row after `state` (a prefill's result, updated in place):
        [B, max_new_tokens] int32; a row's tokens after its first EOS are min(eos) (0 without EOS).
        Arguments already validated (see `generate`)."""
        B = len(state.lengths)
        fill = min(eos) if eos else 0
        new = np.full((B, max_new_tokens), fill, np.int32)
        done = np.zeros(B, bool)
        logits = state.logits
        key = jax.random.key(np.uint32(seed))
        settings = self._sampling_settings(temperature, top_k, top_p)
        sample = self._sample_fn(temperature == 0.0)
        for step in range(max_new_tokens):
            last = step + 1 == max_new_tokens
            where = np.zeros(B + 2, np.int32) if last else self._decode_where(state, step)
            feed = np.concatenate([np.where(done, fill, -1).astype(np.int32), where, np.array([step], np.int32)])
            tok, packed = sample(logits, key, *settings, self._place(feed, REPLICATED))
            if not last:
                logits = self._decode_packed(state, packed)  # queued before the host waits for `tok`
            tok = np.where(done, fill, to_host(tok))
            new[:, step] = tok
            if callback is not None:
                callback(step, tok.copy())
            done |= np.isin(tok, list(eos)) if eos else False
            if done.all():
                break
        return new

    # Warm start -----------------------------------------------------------------------------------
    def warmup(self, max_tokens: int, *, batch_sizes: Sequence[int] = (1,), max_new_tokens: int = 256,
               chunk_size: int | str | None = "auto", logits: bool = True, workers: int | None = None,
               progress: bool = True) -> dict:
        """Compile every program that prompts of 1..`max_tokens` tokens need at these batch sizes: prefill
        pieces (with `logits`, also the full-sequence scoring variants), cache allocation, decode for up
        to `max_new_tokens` new tokens, sampling, and the prefix cache's block copies if it is on.
        Afterwards `prefill`, `generate` (max_new_tokens <= this one) and `logits` of any such length
        compile nothing new: every prefill reserves at least this decode room from now on, so all requests
        share the warmed capacities. Programs are traced one by one and compiled by `workers` threads (XLA
        compiles without the GIL). Enable the prefix cache first if it is to be used: with it on,
        `chunk_size="auto"` cuts long prompts into fixed pieces, which are other programs. Returns
        {"programs", "seconds"}."""
        import time

        from tqdm import tqdm
        if not (_is_int(max_tokens) and max_tokens >= 1):
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer")
        if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        sizes = list(batch_sizes)
        if not sizes or not all(_is_int(b) and b >= 1 for b in sizes):
            raise ValueError(f"batch_sizes={batch_sizes!r} must be positive integers")
        t0 = time.perf_counter()
        self._room_floor = max(self._room_floor, decode_room(max_new_tokens, self.cp))
        wanted = {}
        for B in sizes:
            for pieces in self._all_pieces(int(max_tokens), chunk_size)[::-1]:  # the largest programs first
                for key, args in self._programs_for(B, pieces, max_new_tokens, logits):
                    wanted.setdefault(key, args)
        todo = [(k, a) for k, a in wanted.items() if not isinstance(self._fns.get(k), jax.stages.Compiled)]
        bar = tqdm(total=len(todo), desc="pcp_jax warmup", unit="program", disable=not progress)
        workers = workers or max(1, min(len(todo), (os.cpu_count() or 2) // 2, 16))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {}
            for key, args in todo:  # tracing holds the GIL: one at a time, each compile starts once traced
                futures[pool.submit(self._jit_for(key).lower(*args).compile)] = key
            for fut in concurrent.futures.as_completed(futures):
                self._fns[futures[fut]] = fut.result()
                bar.update(1)
        bar.close()
        for B in sizes:  # the small eager programs around them (sampling, key setup, result copies)
            self.generate(np.zeros((B, 1), np.int32), min(2, max_new_tokens) or 0, chunk_size=chunk_size)
            if logits:
                self.logits(np.zeros((B, 1), np.int32), chunk_size=chunk_size)
        return {"programs": len(todo), "seconds": time.perf_counter() - t0}

    def _all_pieces(self, max_tokens: int, chunk_size) -> list[Pieces]:
        """Every distinct piece plan of prompts of 1..max_tokens tokens (plans change only at multiples of
        a 64-token unit or at ladder steps, but checking each length is cheap and cannot miss one)."""
        return sorted({self._pieces(n, chunk_size) for n in range(1, max_tokens + 1)},
                      key=lambda p: (p.n_pad, p.count))

    def _programs_for(self, batch: int, pieces: Pieces, max_new_tokens: int, logits: bool):
        """(key, abstract arguments) of every program a prompt batch fed as `pieces` runs."""
        C, cfg = self.cp, self.cfg
        _, slots = self._slots(pieces, max_new_tokens)
        spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh, s))
        scalar = spec((), jnp.int32, REPLICATED)
        caches = jax.tree.map(lambda a, s: spec(a.shape, a.dtype, s),
                              jax.eval_shape(lambda: empty_caches(mesh_config(cfg, self.tp), batch, C * slots,
                                                                  self.dtype)), CACHES)
        kpos = spec((batch, C * slots), jnp.int32, KV_SLOTS)
        out = [(("alloc", batch, slots), ())]
        for all_logits in (False, True) if logits else (False,):
            for with_history in (False, True) if pieces.count > 1 else (False,):
                args = (self._state, spec((batch, pieces.n_pad), jnp.int32, TOKENS), spec((batch,), jnp.int32, REPLICATED),
                        scalar, scalar, scalar, spec((batch, cfg.vocab_size), jnp.float32, REPLICATED), caches, kpos)
                out.append((("prefill", batch, pieces.n_pad, slots, all_logits, with_history), args))
        if max_new_tokens:
            packed = spec((2 * batch + 2,), jnp.int32, REPLICATED)
            out.append((("decode", batch, slots, self.decode_attention), (self._state, packed, caches, kpos)))
        if self._prefix_cache is not None:
            block = pieces.n_pad // C
            kv_block = spec(caches["k"].shape[:2] + (C * block,) + caches["k"].shape[3:], self.dtype, STACKED_KV)
            kpos_block = spec((batch, C * block), jnp.int32, KV_SLOTS)
            out.append((("slot_block", block, slots), (caches["k"], caches["v"], kpos, scalar)))
            out.append((("slot_restore", block, slots),
                        (caches["k"], caches["v"], kpos, kv_block, kv_block, kpos_block, scalar)))
        return out

    def _jit_for(self, key):
        """The jitted function behind a program key (built if needed)."""
        kind, *rest = key
        build = {"alloc": self._alloc_fn, "prefill": self._prefill_fn, "decode": self._decode_fn,
                 "slot_block": self._slot_block_fn, "slot_restore": self._slot_restore_fn}[kind]
        return build(*rest)


def _sampling_args(temperature, top_k, top_p, seed, vocab: int):
    """Validated (temperature, top_k, top_p, seed); each error names the value and what is expected."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
    if top_k is not None and not (_is_int(top_k) and 1 <= top_k <= vocab):
        raise ValueError(f"top_k={top_k!r} must be an integer in 1..{vocab} (the vocabulary size)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1]")
    if not (_is_int(seed) and 0 <= seed < 2**32):
        raise ValueError(f"seed={seed!r} must be an integer in 0..2**32-1")
    return float(temperature), None if top_k is None else int(top_k), None if top_p is None else float(top_p), int(seed)


def _distinct_blocks(state) -> dict:
    """{name: device array} of every distinct addressable block of every leaf: a leaf held whole is named by
    its path, a split one by its path and the block's index."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path)
        if leaf.is_fully_replicated:
            out[name] = leaf.addressable_shards[0].data
            continue
        for shard in leaf.addressable_shards:
            out.setdefault(f"{name}{[(s.start, s.stop) for s in shard.index]}", shard.data)
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathers across processes when needed)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _eos_set(eos, vocab: int) -> set[int]:
    """EOS ids as a set: None, one id, or a sequence of ids, each in [0, vocab)."""
    if eos is None:
        return set()
    items = [eos] if _is_int(eos) else eos
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple, set, frozenset, np.ndarray)):
        raise ValueError(f"eos_token_id={eos!r} must be a token id or a list of token ids")
    out = set()
    for e in items:
        if not (_is_int(e) and 0 <= e < vocab):
            raise ValueError(f"eos_token_id={eos!r}: {e!r} is not a token id in [0, {vocab})")
        out.add(int(e))
    return out


def _sample(logits, key, step, temperature, top_k, top_p, *, greedy: bool):
    """Next tokens [B] from logits [B, V] fp32: argmax when greedy, else sampling at `temperature`
    within the `top_k` most likely tokens and the smallest set whose mass reaches `top_p`. Every setting
    is traced, so one program serves every temperature, top_k and top_p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jax.lax.dynamic_index_in_dim(sorted_logits, top_k - 1, axis=1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # smallest set whose mass reaches top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1).astype(jnp.int32)

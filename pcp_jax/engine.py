"""The user-facing model: prefill, full-sequence logits, decoding and warm start over a `cp` x `tp` mesh.

Everything runs in one `shard_map` over the mesh axes `cp` and `tp` (weights split over `tp`:
pcp_jax/parallel/tensor.py; tokens over `cp`): prompts are padded to a length of a ladder (pcp_jax.buckets),
put in zigzag order and split over `cp` (pcp_jax.parallel.zigzag). The exact length is a traced input, so a
session compiles one program per padded length, not per length. Every compiled program is named by a
signature of pcp_jax.programs and kept by `self.programs` (pcp_jax.compiled: in memory, in the on-disk store,
or compiled); a request takes the cheapest plan whose programs are all ready, else (while a warmup refines
in the background) the plan of the coarse ladder (one program per doubling), else the fine plan, compiled on
the request path. `warmup` compiles (or loads) the coarse programs of every length first, then the fine
ones, optionally in the background.

The KV cache of full-attention layers stays where prefill left it: each rank holds its own tokens' K/V plus
a share of the decode slots (new tokens go round-robin: decode step j writes on rank j mod C, at slot
prefill_slots + j div C). GDN conv and recurrent states are small and replicated over `cp` (split by heads
over `tp`, like the KV cache). No rank ever holds the whole KV cache.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pcp_jax import compile_cache, prefix_cache
from pcp_jax.buckets import (STEPS, Pieces, all_plans, alternatives, capacity, check_chunk_size, coarse_pieces,
                             decode_room, plan_pieces)
from pcp_jax.compiled import CompiledPrograms, default_workers
from pcp_jax.config import ModelConfig
from pcp_jax.fp8 import ACTIVATIONS, Fp8Param, describe_weights, is_hopper, resolve_weights
from pcp_jax.kernels import KERNEL_CHOICES
from pcp_jax.kernels.attention.api import DECODE_METHODS
from pcp_jax.kernels.backend import preload_gpu_backends, use_gpu_kernels
from pcp_jax.inputs import as_batch, check_new_tokens, check_warmup, is_int
from pcp_jax.memory import DTYPES, auto_piece_tokens, check_request, default_prefill_budget, device_memory_stats
from pcp_jax.model import LayerPlan, Qwen35
from pcp_jax.parallel.gdn_cp import resolve_strategy
from pcp_jax.parallel.tensor import DictSource, check_tp, place_params
from pcp_jax.parallel.zigzag import token_permutation
from pcp_jax.program_store import ProgramStore
from pcp_jax.programs import (Alloc, CopyBlock, Decode, Prefill, ProgramContext, RestoreStates, Sample,
                              SnapshotStates)
from pcp_jax.sampling import Settings, eos_set
from pcp_jax.sharding import CP_AXIS, REPLICATED, TOKENS, TP_AXIS, make_mesh, with_tp_axis
from pcp_jax.weights import SCALE


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
    prefix: object = None      # with the prefix cache on: what the generation after it adds to the cache


class Model:
    """A Qwen3.5 model placed on a `cp` x `tp` mesh. Build it with `pcp_jax.load_model` or
    `Model(cfg, params, cp=C, tp=T)`: `params` is the flat checkpoint contract {name: array} or a
    `TensorSource` (pcp_jax.parallel.tensor: names/shape/read of contract tensors), from which each device
    reads only the blocks it holds.

    `prefill_budget_bytes`: activation memory per device that one prefill piece may use; with
    `chunk_size="auto"` (the default) longer prompts go in pieces. Default: 40% of the device memory
    left after the weights where the backend reports it, else 2 GiB. `scan_decode`: run decode's layer
    groups as a loop (one compiled body) or unrolled; "auto" (default) scans MoE models and unrolls dense
    ones: a scanned step reads each layer's weights through a dynamic slice that XLA copies (the 9B step
    1.6x slower on an H200), while an unrolled MoE step compiles every layer's expert kernels apart (8 layers
    of the 35B-A3B: 34 s against 17 s scanned, for a step 9% faster; docs/BENCHMARKS.md). `bucket_steps`:
    padded lengths per doubling of the length ladder (pcp_jax.buckets; fewer: fewer programs to warm up,
    more padding); None pads prompts only to a multiple of 2·C·64 tokens (the least padding, but a program
    per length). `compile_cache_dir`: the compile-cache folder (our store of executables under
    it), "off", or None for the default (pcp_jax.compile_cache). `weights_digest`: a
    digest of the weights already known (stored at conversion), so the prefix cache need not hash them.
    `consume_params`: empty `params` while building (each tensor leaves the dict once its device copies are
    made), so that no weight is held twice at load. `decode_attention`: how decode attends to the KV cache
    (a method of pcp_jax.kernels.attention.api.decode_attention_stacked: "dense", "split", "split-sum",
    "pallas"), or "auto": "pallas" where `kernels` runs GPU kernels (9B generate at 128k context 9.59 ->
    6.63 ms/token on an H200), else "dense". The attribute of that name holds the method chosen and may be
    changed between calls (each method is its own decode program). `weights`: what the devices hold of an
    FP8 checkpoint (pcp_jax.fp8): "dequantize" (the dequantized weights in `dtype`, exact), "fp8" (weight-only FP8
    matmuls), "fp8-w8a8" (FP8 activations too), or "auto" (default: "fp8" for an FP8 checkpoint in bfloat16 on a
    Hopper GPU with GPU kernels, else "dequantize"); the attribute `weights_mode` holds what it resolved to."""

    def __init__(self, cfg: ModelConfig, params, *, cp: int = 1, tp: int = 1, mesh: Mesh | None = None,
                 dtype: str = "bfloat16", kernels: str = "auto", gdn_strategy: str = "auto",
                 prefill_budget_bytes: int | None = None, scan_decode: bool | str = "auto",
                 bucket_steps: int | None = STEPS, compile_cache_dir=None, weights_digest: bytes | None = None,
                 consume_params: bool = False, decode_attention: str = "auto", weights: str = "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}; expected one of {list(KERNEL_CHOICES)}")
        if prefill_budget_bytes is not None and not (is_int(prefill_budget_bytes) and prefill_budget_bytes > 0):
            raise ValueError(f"prefill_budget_bytes={prefill_budget_bytes!r} must be a positive integer")
        if scan_decode not in ("auto", True, False):
            raise ValueError(f"scan_decode={scan_decode!r}; expected True, False or 'auto'")
        if bucket_steps is not None and not (is_int(bucket_steps) and bucket_steps >= 1
                                             and not bucket_steps & (bucket_steps - 1)):
            raise ValueError(f"bucket_steps={bucket_steps!r} must be a power of two (lengths per doubling) or None")
        resolve_strategy(gdn_strategy, 0, 1)  # validates the name
        mesh = make_mesh(cp, tp) if mesh is None else with_tp_axis(mesh)
        for name, v in (("cp", cp), ("tp", tp)):
            if v not in (1, mesh.shape[name]):
                raise ValueError(f"{name}={v} disagrees with the mesh's {name!r} axis of size {mesh.shape[name]}")
        check_tp(cfg, mesh.shape[TP_AXIS])
        self.cfg, self.mesh, self.dtype_name = cfg, mesh, dtype
        self.cp, self.tp = mesh.shape[CP_AXIS], mesh.shape[TP_AXIS]
        self.kernels, self.gdn_strategy, self.dtype = kernels, gdn_strategy, DTYPES[dtype]
        self.decode_attention = decode_attention
        self.bucket_steps = bucket_steps
        self.weights_digest = weights_digest
        cache_dir = compile_cache.folder(compile_cache_dir)
        preload_gpu_backends(kernels)  # before any trace: see kernels/backend.py
        plan = LayerPlan.of(cfg.layer_types)
        source = DictSource(params, consume=consume_params) if isinstance(params, dict) else params
        has_fp8 = any(name.endswith(SCALE) for name in source.names())
        self.weights_mode = resolve_weights(weights, has_fp8, dtype, use_gpu_kernels(kernels), is_hopper(mesh))
        placed = place_params(cfg, mesh, source, self.dtype, plan.period, plan.groups,
                              fp8=self.weights_mode != "dequantize")
        placed = {name: dataclasses.replace(p, activations=ACTIVATIONS[self.weights_mode], kernels=kernels)
                  if isinstance(p, Fp8Param) else p for name, p in placed.items()}
        graphdef, self.weights = nnx.split(Qwen35(cfg, placed, self.dtype, self.tp))
        weights_key = describe_weights(placed)
        del placed
        scan = cfg.is_moe if scan_decode == "auto" else scan_decode
        context = ProgramContext(cfg, mesh, self.dtype, kernels, gdn_strategy, scan, graphdef,
                                 jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                              self.weights), weights_key)
        self.programs = CompiledPrograms(context, ProgramStore.open(cache_dir))
        self.prefix_cache = None
        self._room_floor = 0  # decode slots every prefill reserves at least (set by warmup)
        if prefill_budget_bytes is None:  # 40% of what the weights left free (pcp_jax.memory)
            stats = device_memory_stats(mesh) or {}
            prefill_budget_bytes = default_prefill_budget(stats.get("bytes_in_use", 0), stats.get("bytes_limit"))
        self.prefill_budget_bytes = prefill_budget_bytes
        self.auto_piece_tokens = auto_piece_tokens(cfg, self.cp, jnp.dtype(self.dtype).itemsize, prefill_budget_bytes,
                                                   tp=self.tp)

    @property
    def decode_attention(self) -> str:
        return self._decode_attention

    @decode_attention.setter
    def decode_attention(self, method: str) -> None:
        if method not in ("auto", *DECODE_METHODS):
            raise ValueError(f"decode_attention={method!r}; expected one of {['auto', *DECODE_METHODS]}")
        self._decode_attention = ("pallas" if use_gpu_kernels(self.kernels) else "dense") if method == "auto" else method

    # Input checks and placement ------------------------------------------------------------------
    def _as_batch(self, input_ids) -> tuple[np.ndarray, np.ndarray]:
        return as_batch(input_ids, self.cfg.vocab_size)

    def to_device(self, host, spec=REPLICATED) -> jax.Array:
        """Host array (the same on every process) -> global array on the mesh split as `spec`; works
        multi-process; compiles nothing."""
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, NamedSharding(self.mesh, spec), lambda idx: host[idx])

    def _check_request(self, batch: int, n: int, max_new_tokens: int, slots: int) -> None:
        check_request(self.cfg, self.mesh, jnp.dtype(self.dtype).itemsize, self.tp, batch, n, max_new_tokens, slots)

    # Plans: which programs feed a prompt ---------------------------------------------------------
    def _room(self, max_new_tokens: int) -> int:
        return max(decode_room(max_new_tokens, self.cp), self._room_floor)

    def _signatures(self, batch: int, pieces: Pieces, max_new_tokens: int, all_logits: bool, history: int = 0) -> list:
        """Every program a prompt batch fed as `pieces` after `history` restored slots per rank runs, through
        its last decode step (the prefix cache's restores aside)."""
        block = pieces.n_pad // self.cp
        offset = -(-history // block) * block
        slots = capacity(offset + pieces.count * block + self._room(max_new_tokens))
        capture = self.prefix_cache is not None and not all_logits
        sigs = [Alloc(batch, slots)] + [Prefill(batch, pieces.n_pad, slots, all_logits, with_history, capture)
                                        for with_history in sorted({history > 0 or p > 0 for p in range(pieces.count)})]
        if max_new_tokens:
            sigs += [Decode(batch, slots, self.decode_attention)]
        if capture:
            sigs += [CopyBlock(batch, block, slots), RestoreStates(batch)]
            if max_new_tokens:
                sigs += [SnapshotStates(batch), CopyBlock(batch, slots - offset - pieces.count * block, slots)]
        return sigs

    def _plan(self, batch: int, n: int, max_new_tokens: int, chunk_size, all_logits: bool, history: int = 0) -> Pieces:
        """How to feed n tokens of a batch (after `history` restored slots per rank): the cheapest plan whose
        programs are all compiled (or in the store); else, while a warmup refines in the background, the
        coarse ladder's plan (compiled first by warmup: the request waits for it at most); else the fine plan,
        which the request compiles (at most 12.5% padding, for the same compile time as a coarse program).
        Exact lengths (bucket_steps None) have one plan."""
        check_chunk_size(chunk_size, self.cp)
        A = self.auto_piece_tokens
        if self.bucket_steps is None:
            return plan_pieces(n, self.cp, chunk_size, A, steps=None)
        for pieces in alternatives(n, self.cp, chunk_size, A, self.bucket_steps):
            sigs = self._signatures(batch, pieces, max_new_tokens, all_logits, history)
            if all(self.programs.ready(s) for s in sigs):
                return pieces
        if self.programs.status()["pending"]:
            return coarse_pieces(n, self.cp, chunk_size, A, self.bucket_steps)
        return plan_pieces(n, self.cp, chunk_size, A, steps=self.bucket_steps)

    # Prefill --------------------------------------------------------------------------------------
    def _run_prefill(self, input_ids, max_new_tokens: int, chunk_size, all_logits: bool):
        """Prefill a batch: restore the longest prefix the prefix cache holds (unless `all_logits`: full-sequence
        logits need every position's activations), then feed the rest in the planned pieces, each zigzag-split
        over `cp` and attending to the slots before it. With the cache on, each piece also captures the GDN
        states of the prompt's last block boundaries and leaves its KV slots as a segment
        (pcp_jax.prefix_cache)."""
        ids, lengths = self._as_batch(input_ids)
        B, N = ids.shape
        C = self.cp
        cache = None if all_logits else self.prefix_cache
        rows = [ids[b, : lengths[b]] for b in range(B)]
        keys = cache.chain(self, rows) if cache is not None else []
        entry = cache.longest(keys, B) if cache is not None else None
        start = entry.position if entry is not None else 0
        history = sum(segment.block for segment, _ in entry.segments) if entry is not None else 0
        rest = N - start
        pieces = self._plan(B, max(rest, 1), max_new_tokens, chunk_size, all_logits, history)
        block = pieces.n_pad // C
        offset = -(-history // block) * block
        prefill_slots = offset + (pieces.count * block if rest else 0)
        slots = capacity(prefill_slots + self._room(max_new_tokens))
        self._check_request(B, N, max_new_tokens, slots)
        caches, kpos = self.programs.get(Alloc(B, slots))()
        logits = self.to_device(np.zeros((B, self.cfg.vocab_size), np.float32))
        segments = []  # (segment, limit, first position) in slot order, for the prefix cache's entries
        if entry is not None:
            caches, kpos, logits, _ = prefix_cache.restore(self, cache, entry, caches, kpos)
            segments = [(segment, limit, 0) for segment, limit in entry.segments]
        captures = prefix_cache.capture_positions(cache.block_tokens, start, int(lengths.min())) if cache else None
        captured, all_out = [None] * len(captures or ()), []
        perm = token_permutation(pieces.n_pad, C)
        scalar = lambda v: self.to_device(np.int32(v))
        for p in range(pieces.count if rest else 0):
            first = start + p * pieces.tokens
            chunk = np.zeros((B, pieces.n_pad), np.int32)
            part = ids[:, first:first + pieces.tokens]
            chunk[:, : part.shape[1]] = part
            here = [q if first < q <= first + pieces.tokens else -1 for q in captures] if cache else []
            sig = Prefill(B, pieces.n_pad, slots, all_logits, with_history=entry is not None or p > 0,
                          capture=cache is not None)
            logits, caches, kpos, piece_logits, piece_captured = self.programs.get(sig)(
                self.weights, self.to_device(chunk[:, perm], TOKENS), self.to_device(lengths), scalar(first),
                scalar(pieces.tokens), scalar(offset + p * block), logits, caches, kpos,
                *([self.to_device(np.asarray(here, np.int32))] if cache else []))
            if all_logits:
                all_out.append((piece_logits, part.shape[1]))
            if cache is not None:
                segments.append((prefix_cache.copy_segment(self, caches, kpos, offset + p * block, block),
                                 prefix_cache.NO_LIMIT, first))
                held = prefix_cache.Held.of(piece_captured)
                captured = [held if q > 0 else c for q, c in zip(here, captured)]
        trail = None
        if cache is not None:
            prefix_cache.keep(cache, keys, captures, captured, segments)
            # the buffer a generation snapshots into: any capture buffer of the right shape will do
            base = piece_captured if rest else entry.states.arrays
            trail = prefix_cache.Trail(cache, rows, segments, base)
        return PrefillResult(logits, lengths, caches, kpos, slots, prefill_slots, trail), all_out

    def prefill(self, input_ids, *, max_new_tokens: int = 0, chunk_size: int | str | None = "auto") -> PrefillResult:
        """Prefill prompts (a right-padded [B, N] array or a list of prompts) across `cp`. The prompt is
        fed in pieces, each zigzag-sharded over `cp` and attending to the KV cached by the earlier pieces,
        so activation memory follows the piece, not the prompt: `chunk_size="auto"` (default) uses one
        piece up to `auto_piece_tokens` and equal pieces above it, an int S pieces of S tokens (at least
        cp·64), None one piece. Returns next-token logits and caches with room for `max_new_tokens` decode
        steps."""
        check_new_tokens(max_new_tokens)
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
    def enable_prefix_cache(self, max_bytes: int | None = None, *, block_tokens: int = prefix_cache.BLOCK_TOKENS,
                            cache=None):
        """Keep what a later prompt sharing a prefix needs to resume at a block boundary (every `block_tokens`
        positions): the prompt's KV slots and the GDN states at its last two boundaries, taken from the prefill
        that runs anyway (one shot: turning the cache on never chunks a prefill), and those of the boundaries
        its generated tokens cross, so the next chat turn resumes after the answer (pcp_jax.prefix_cache).
        Within `max_bytes`, least recently used first. Or pass `cache=` an existing `PrefixCache` to share it
        between models: entries are keyed by the model's weights, dtype, devices and cp x tp layout, so they
        never cross."""
        if (max_bytes is None) == (cache is None):
            raise ValueError("give exactly one of max_bytes (a new cache) or cache= (a shared PrefixCache)")
        if cache is not None and not isinstance(cache, prefix_cache.PrefixCache):
            raise ValueError(f"cache= must be a PrefixCache (from enable_prefix_cache), got {type(cache).__name__}")
        self.prefix_cache = cache if cache is not None else prefix_cache.PrefixCache(max_bytes, block_tokens)
        return self.prefix_cache

    def prefix_cache_stats(self) -> dict:
        if self.prefix_cache is None:
            raise ValueError("the prefix cache is not enabled: call model.enable_prefix_cache(max_bytes) first")
        return self.prefix_cache.stats()

    # Decode ---------------------------------------------------------------------------------------
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
        return self._decode_packed(state, self.to_device(np.concatenate([tokens.astype(np.int32), where])))

    def _decode_where(self, state: PrefillResult, step: int) -> np.ndarray:
        """Where decode step `step` writes: [B + 2] int32 = positions [B], owner rank, slot (checked
        against the room prefill reserved)."""
        C = self.cp
        if not (is_int(step) and step >= 0):
            raise ValueError(f"step={step!r} must be a non-negative integer (0 for the first token after prefill)")
        slot = state.prefill_slots + step // C
        if slot >= state.slots_per_rank:
            raise ValueError(f"decode step {step} exceeds the cache: prefill reserved room for "
                             f"{(state.slots_per_rank - state.prefill_slots) * C} new tokens (max_new_tokens)")
        return np.concatenate([(state.lengths + step).astype(np.int32), np.array([step % C, slot], np.int32)])

    def _decode_packed(self, state: PrefillResult, packed: jax.Array) -> jax.Array:
        """The decode step on a device array packed [2B + 2] int32 (see programs.Decode)."""
        run = self.programs.get(Decode(len(state.lengths), state.slots_per_rank, self.decode_attention))
        state.logits, state.caches, state.kpos = run(self.weights, packed, state.caches, state.kpos)
        return state.logits

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
                 callback: Callable[[int, np.ndarray], None] | None = None,
                 chunk_size: int | str | None = "auto") -> np.ndarray:
        """Prompts + `max_new_tokens` tokens: np.ndarray [B, N + max_new_tokens] int32 (greedy at
        temperature 0, or below float32's smallest normal). Rows of a ragged batch are right-aligned to their
        own length in the output: row b holds its prompt, then its new tokens, then EOS padding (or 0 without
        EOS). Rows that hit EOS are padded with EOS. `callback(step, tokens[B])` sees each new token as it is
        made. `chunk_size` feeds the prompt in pieces (see `prefill`). `generate` is `prefill` then `decode`."""
        check_new_tokens(max_new_tokens)
        settings = Settings.of(temperature, top_k, top_p, seed, self.cfg.vocab_size)
        ids, lengths = self._as_batch(input_ids)
        eos = eos_set(eos_token_id, self.cfg.vocab_size)
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
        new = self._decode_loop(state, max_new_tokens, settings, eos, callback)
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
        check_new_tokens(max_new_tokens)
        room = (state.slots_per_rank - state.prefill_slots) * self.cp
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the room this prefill reserved for "
                             f"{room} new tokens (prefill(..., max_new_tokens=...))")
        settings = Settings.of(temperature, top_k, top_p, seed, self.cfg.vocab_size)
        eos = eos_set(eos_token_id, self.cfg.vocab_size)
        if max_new_tokens == 0:
            return np.zeros((len(state.lengths), 0), np.int32)
        return self._decode_loop(state, max_new_tokens, settings, eos, callback)

    def _decode_loop(self, state: PrefillResult, max_new_tokens: int, settings: Settings, eos: frozenset,
                     callback) -> np.ndarray:
        """`max_new_tokens` >= 1 new tokens per row after `state` (updated in place): [B, max_new_tokens]
        int32; a row's tokens after its first EOS are min(eos) (0 without EOS). Each step's decode is queued
        on the device before the host waits for that step's sampled tokens (they are fed from device
        memory), so the host's bookkeeping and the next dispatch overlap the device's work. When every row
        has stopped at EOS, the one decode step already queued is wasted. With the prefix cache on, the
        boundaries the generation crosses are kept (prefix_cache.Snapshots)."""
        B = len(state.lengths)
        fill = min(eos) if eos else 0
        new = np.full((B, max_new_tokens), fill, np.int32)
        done = np.zeros(B, bool)
        logits = state.logits
        sample = self.programs.get(Sample(B, settings.greedy))
        device_settings = [self.to_device(np.asarray(v, t)) for v, t in (
            (settings.seed, np.uint32), (settings.temperature, np.float32), (settings.top_k, np.int32),
            (settings.top_p, np.float32))]
        snapshots = prefix_cache.Snapshots(self, state, max_new_tokens) if state.prefix is not None else None
        steps = 0
        for step in range(max_new_tokens):
            last = step + 1 == max_new_tokens
            where = np.zeros(B + 2, np.int32) if last else self._decode_where(state, step)
            feed = np.concatenate([np.where(done, fill, -1).astype(np.int32), where, np.array([step], np.int32)])
            tok, packed = sample(logits, *device_settings, self.to_device(feed))
            if not last:
                logits = self._decode_packed(state, packed)  # queued before the host waits for `tok`
                if snapshots is not None:
                    snapshots.after(step)
            tok = np.where(done, fill, to_host(tok))
            new[:, step] = tok
            steps = step + 1
            if callback is not None:
                callback(step, tok.copy())
            done |= np.isin(tok, list(eos)) if eos else False
            if done.all():
                break
        if snapshots is not None:
            snapshots.keep(new[:, :steps])
        return new

    # Warm start -----------------------------------------------------------------------------------
    def warmup(self, max_tokens: int, *, batch_sizes: Sequence[int] = (1,), max_new_tokens: int = 256,
               chunk_size: int | str | None = "auto", logits: bool = True, workers: int | None = None,
               progress: bool = True, background: bool = False) -> dict:
        """Make every program that prompts of 1..`max_tokens` tokens at these batch sizes need ready: prefill
        pieces (with `logits`, also the full-sequence scoring variants), cache allocation, decode for up to
        `max_new_tokens` new tokens, sampling, and the prefix cache's block copies if it is on. Programs in
        the store (pcp_jax.program_store) are loaded, not compiled.

        First the coarse ladder (one padded length per doubling): when those are ready every such prompt is
        served without compiling (at most 2x padding), and that is when this returns with
        `background=True`; the fine ladder (at most 12.5% padding) is then compiled in the background while
        requests run, each request taking the cheapest plan already compiled (`compile_status()` counts
        what is pending). With `background=False` it returns when the fine ladder is ready too, as it always
        does in a job of several processes (they must all choose the same programs for a request, so none may
        be ahead of another). Every prefill reserves at least this decode room from now on, so all requests
        share the warmed capacities.
        Returns {"programs", "compiled", "loaded", "pending", "ready_seconds", "seconds"}."""
        from tqdm import tqdm
        sizes = check_warmup(max_tokens, max_new_tokens, batch_sizes, workers)
        check_chunk_size(chunk_size, self.cp)
        A = self.auto_piece_tokens
        room = self._room(max_new_tokens)
        longest = plan_pieces(max_tokens, self.cp, chunk_size, A, steps=self.bucket_steps)
        # Checked before anything is compiled or changed: the longest request must be one the model serves.
        self._check_request(max(sizes), max_tokens, max_new_tokens,
                            capacity(longest.count * longest.n_pad // self.cp + room))
        self._room_floor = room
        t0 = time.perf_counter()
        plans = {coarse: all_plans(max_tokens, self.cp, chunk_size, A, steps=self.bucket_steps, coarse=coarse)
                 for coarse in (True, False)}
        signatures = {}
        for coarse, shapes in plans.items():
            signatures[coarse] = [s for B in sizes for count, n_pad in sorted(shapes, key=lambda p: -p[1])
                                  for all_logits in ((False, True) if logits else (False,))
                                  for s in self._signatures(B, Pieces(n_pad, n_pad, count), max_new_tokens, all_logits)]
            if max_new_tokens:
                signatures[coarse] += [Sample(B, greedy) for B in sizes for greedy in (True, False)]
        workers = workers or default_workers()
        before = self.programs.status()
        coarse_futures = self.programs.prepare(signatures[True], workers)
        fine_futures = self.programs.prepare(signatures[False], workers)
        bar = tqdm(total=len(coarse_futures) + len(fine_futures), desc="pcp_jax warmup", unit="program",
                   disable=not progress)
        for fut in coarse_futures:
            fut.result()
            bar.update(1)
        ready = time.perf_counter() - t0
        if progress:
            bar.set_description("pcp_jax warmup (ready; refining)")
        if not background or jax.process_count() > 1:
            for fut in fine_futures:
                fut.result()
                bar.update(1)
        bar.close()
        after = self.programs.status()
        return {"programs": len(set(signatures[True]) | set(signatures[False])),
                "compiled": after["compiled"] - before["compiled"], "loaded": after["loaded"] - before["loaded"],
                "pending": after["pending"], "ready_seconds": ready, "seconds": time.perf_counter() - t0}

    def compile_status(self) -> dict:
        """Programs of this model: {"compiled" here, "loaded" from the store, "pending" in the background,
        "failed" in the background, "stored" (compiled and written to the store), "store" (its folder or
        None)} (pcp_jax.compiled)."""
        return self.programs.status()


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathers across processes when needed)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

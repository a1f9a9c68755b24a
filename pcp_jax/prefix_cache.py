"""Prefix cache: resume a prompt at the last block boundary it shares with an earlier prompt (or with an
earlier prompt and the tokens generated after it), without chunking any prefill.

Boundaries sit at multiples of `block_tokens` positions, whatever pieces a prefill was cut into. A batch's
prefix hashes its blocks in a chain (key_b = H(key_{b-1}, every row's tokens of block b)) from a root of the
model's fingerprint (config and weights), dtype, devices, cp, tp, batch size and block size, so boundary b
matches only if every earlier token of every row matches, and never across models, dtypes or layouts.

What is kept:
- KV **segments**: the slots one prefill piece (or one generation) wrote on every rank, every attention
  layer, still split over `cp` with the positions they hold (`kpos`). A segment is stored once and shared by
  every entry whose prefix runs through it; an entry says up to which position each of its segments is
  valid (a later prompt that diverged re-prefilled the rest into a segment of its own).
- **Entries** at chosen boundaries: the GDN conv and recurrent states there (and the next-token logits, for a
  prompt that ends exactly there), which a capturing prefill takes from its one-shot pass (pcp_jax.programs:
  Prefill(capture=True); the GDN kernels keep the state where they pass the boundary), or a generation takes
  when its tokens cross a boundary.
Which boundaries keep states: the last two of every prefill (at most `block_tokens` apart: a question or a
divergent tail shorter than a block after a shared document still finds the document's last boundary), and
the last two that a generation crosses (so the next chat turn, which re-sends the answer, resumes after it).
A GDN state is large (the 9B: about 50 MB in fp32), so keeping one per boundary would cost a prompt of 100k
tokens 5 GB; two per prompt bound it whatever the length.

A hit restores the entry's segments into the new cache (each rank its own shards; slots past their validity
marked empty), its states, and prefills the rest of the prompt as one piece attending to them. The budget is
LRU by bytes over entries; a segment or a captured-state buffer shared by several entries is counted once
and freed with the last entry that uses it, so an evicted entry never breaks another.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import weakref

import jax
import numpy as np

from pcp_jax.inputs import is_int
from pcp_jax.programs import CAPTURES, CopyBlock, RestoreSegment, RestoreStates, SnapshotStates

BLOCK_TOKENS = 1024  # default: a question or chat turn shorter than this resumes right after the shared prefix
NO_LIMIT = 2**31 - 1  # a segment valid up to its last position
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fingerprint(model) -> bytes:
    """A collision-resistant key of a model's config and weights, for keys that must not cross models:
    sha256 of the config and of the weights' digest (the one stored at conversion when the model was loaded
    from a converted folder, else a sha256 of every weight's name, dtype, shape and bytes, computed once per
    model, one block at a time, on first use)."""
    if model not in _FINGERPRINTS:
        from pcp_jax.loading import weights_digest
        weights = model.weights_digest or weights_digest(_distinct_blocks(model.weights))
        _FINGERPRINTS[model] = hashlib.sha256(repr(model.cfg).encode() + weights).digest()
    return _FINGERPRINTS[model]


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


@dataclasses.dataclass(eq=False)
class Held:
    """Device arrays shared by entries: counted once in the budget, freed with the last entry using them."""
    arrays: object
    nbytes: int
    users: int = 0

    @classmethod
    def of(cls, arrays) -> "Held":
        return cls(arrays, sum(a.nbytes for a in jax.tree.leaves(arrays)))


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """Slots one piece or one generation wrote: `kv` Held of (k, v [NA, B, C*block, Hkv, hd], kpos
    [B, C*block]); `block` slots per rank."""
    kv: Held
    block: int


@dataclasses.dataclass(eq=False)
class Entry:
    """A boundary at `position` a later prompt can resume at: its KV `segments` as (segment, limit) in slot
    order (the segment's slots holding positions >= limit are not part of this prefix), and capture `index` of
    the captured-state buffer `states` ({"conv", "state", "logits"}: pcp_jax.programs.Prefill)."""
    position: int
    segments: tuple[tuple[Segment, int], ...]
    states: Held
    index: int

    def helds(self):
        return [self.states] + [segment.kv for segment, _ in self.segments]


class PrefixCache:
    """Entries at block boundaries within `max_bytes` (LRU), shared by any models that enable it (keys never
    cross models). `block_tokens`: the boundary spacing, a positive multiple of 64."""

    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if not (is_int(max_bytes) and max_bytes >= 0):
            raise ValueError(f"max_bytes={max_bytes!r} must be a non-negative integer (bytes)")
        if not is_int(block_tokens) or block_tokens < 64 or block_tokens % 64:
            raise ValueError(f"block_tokens={block_tokens!r} must be a positive multiple of 64 (GDN chunks)")
        self.max_bytes, self.block_tokens = int(max_bytes), int(block_tokens)
        self._entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()
        self._held: dict[int, Held] = {}
        self._stats = dict(hits=0, misses=0, tokens_reused=0, evictions=0)

    def stats(self) -> dict:
        """hits / misses (prefills that restored a boundary or not), tokens_reused (prefix tokens not prefilled,
        over all rows), evictions, bytes_held (every segment and state buffer once), entries, segments."""
        segments = sum(1 for h in self._held.values() if not isinstance(h.arrays, dict))
        return dict(self._stats, bytes_held=sum(h.nbytes for h in self._held.values()), entries=len(self._entries),
                    segments=segments)

    # Keys -----------------------------------------------------------------------------------------
    def chain(self, model, rows: list[np.ndarray]) -> list[bytes]:
        """keys[b - 1] = the key of boundary b * block_tokens, for every boundary all `rows` (token ids, one
        array per row of the batch) reach."""
        h = hashlib.sha256(fingerprint(model))
        devices = [d.id for d in model.mesh.devices.flat]
        h.update(repr((model.dtype_name, devices, model.cp, model.tp, len(rows), self.block_tokens)).encode())
        key, keys, T = h.digest(), [], self.block_tokens
        for b in range(min(len(r) for r in rows) // T):
            block = np.stack([np.asarray(r[b * T:(b + 1) * T], np.int32) for r in rows])
            key = hashlib.sha256(key + block.tobytes()).digest()
            keys.append(key)
        return keys

    def longest(self, keys: list[bytes], batch: int) -> Entry | None:
        """The entry of the last boundary of `keys` that has one (counted as a hit, and refreshed), else None (a
        miss)."""
        for key in reversed(keys):
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._stats["hits"] += 1
                self._stats["tokens_reused"] += entry.position * batch
                return entry
        self._stats["misses"] += 1
        return None

    def add(self, key: bytes, entry: Entry) -> None:
        """Keep `entry` under `key` (an existing entry there stays), then evict least recently used entries
        until the bytes held fit the budget; an entry larger than the budget by itself is not kept."""
        if key in self._entries:
            return
        new = {id(h): h for h in entry.helds() if id(h) not in self._held}
        if sum(h.nbytes for h in new.values()) > self.max_bytes:
            return
        for h in entry.helds():
            self._held.setdefault(id(h), h).users += 1
        self._entries[key] = entry
        while sum(h.nbytes for h in self._held.values()) > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._release(old)
            self._stats["evictions"] += 1

    def _release(self, entry: Entry) -> None:
        for h in entry.helds():
            h.users -= 1
            if h.users == 0:
                del self._held[id(h)]


@dataclasses.dataclass
class Trail:
    """What a prefill with the prefix cache on leaves for the generation after it (PrefillResult.prefix): the
    rows' tokens, the KV segments of the prompt as (segment, limit, first position), and a capture buffer (the
    base the generation's snapshots are taken into; its other captures are never read)."""
    cache: PrefixCache
    rows: list[np.ndarray]
    segments: list[tuple[Segment, int]]
    captured: dict


def restore(model, cache: PrefixCache, entry: Entry, caches: dict, kpos):
    """Write `entry`'s segments at consecutive slots from 0 (each masked past its limit) and its states into
    freshly allocated `caches` / `kpos` (donated); returns (caches, kpos, next-token logits at the boundary,
    slots per rank the segments take)."""
    batch, slots = kpos.shape[0], kpos.shape[1] // model.cp
    k, v, offset = caches["k"], caches["v"], 0
    for segment, limit in entry.segments:
        put = model.programs.get(RestoreSegment(batch, segment.block, slots))
        k, v, kpos = put(k, v, kpos, *segment.kv.arrays, model.to_device(np.int32(offset)),
                         model.to_device(np.int32(limit)))
        offset += segment.block
    conv, state, logits = model.programs.get(RestoreStates(batch))(entry.states.arrays, model.to_device(np.int32(entry.index)))
    return {"k": k, "v": v, "conv": conv, "state": state}, kpos, logits, offset


def copy_segment(model, caches: dict, kpos, offset: int, block: int) -> Segment:
    """The `block` slots per rank from `offset` of every attention layer's cache, as a segment."""
    batch, slots = kpos.shape[0], kpos.shape[1] // model.cp
    arrays = model.programs.get(CopyBlock(batch, block, slots))(caches["k"], caches["v"], kpos,
                                                                model.to_device(np.int32(offset)))
    return Segment(Held.of(arrays), block)


def capture_positions(block_tokens: int, start: int, end: int) -> list[int]:
    """The (at most CAPTURES) last block boundaries in (start, end], ascending, padded with -1."""
    last = end // block_tokens * block_tokens
    out = [p for p in range(last, start, -block_tokens)][:CAPTURES][::-1]
    return out + [-1] * (CAPTURES - len(out))


def keep(cache: PrefixCache, keys: list[bytes], positions: list[int], captured: list, segments) -> None:
    """Add an entry for each capture: positions[k] > 0 was captured in buffer captured[k] (a Held) at index k;
    `segments` (segment, limit, first position it holds) in slot order: an entry keeps those starting before
    its position, each valid up to min(limit, position)."""
    for k, position in enumerate(positions):
        if position <= 0 or captured[k] is None:
            continue
        chain = tuple((seg, min(limit, position)) for seg, limit, first in segments if first < position)
        cache.add(keys[position // cache.block_tokens - 1], Entry(position, chain, captured[k], k))


class Snapshots:
    """The boundaries a generation crosses, kept for the next turn. Made from a prefill's result `state`
    (with its Trail) before `max_new_tokens` decode steps: `after(step)`, right after decode step `step` was
    queued, snapshots every row whose token at position q - 1 that step fed (its state is then the one at
    boundary q: each row of a ragged batch crosses at its own step); `keep(new)` with the tokens generated
    adds an entry for each of the (at most CAPTURES) last boundaries beyond every prompt that every row
    crossed, with the generation's KV slots as one more segment."""

    def __init__(self, model, state, max_new_tokens: int):
        self.model, self.state, self.trail = model, state, state.prefix
        lengths = state.lengths
        self.captures = capture_positions(self.trail.cache.block_tokens, int(lengths.max()),
                                          int(lengths.min()) + max_new_tokens - 1)
        self.takes = {step: take for step in range(max_new_tokens - 1)
                      if (take := np.array([[q > 0 and n + step + 1 == q for n in lengths]
                                            for q in self.captures])).any()}
        self.buffer, self.taken = self.trail.captured, np.zeros((CAPTURES, len(lengths)), bool)

    def after(self, step: int) -> None:
        if step in self.takes:
            state, model = self.state, self.model
            self.buffer = model.programs.get(SnapshotStates(len(state.lengths)))(
                self.buffer, state.caches["conv"], state.caches["state"], state.logits,
                model.to_device(self.takes[step]))
            self.taken |= self.takes[step]

    def keep(self, new: np.ndarray) -> None:
        """new [B, steps]: the tokens generated (steps decode steps ran)."""
        taken = self.taken.all(axis=1)  # every row's state at that boundary
        if not taken.any():
            return
        state, trail = self.state, self.trail
        segment = copy_segment(self.model, state.caches, state.kpos, state.prefill_slots,
                               state.slots_per_rank - state.prefill_slots)
        rows = [np.concatenate([row, new[b]]) for b, row in enumerate(trail.rows)]
        keep(trail.cache, trail.cache.chain(self.model, rows), [q if t else -1 for q, t in zip(self.captures, taken)],
             [Held.of(self.buffer)] * CAPTURES, trail.segments + [(segment, NO_LIMIT, 0)])

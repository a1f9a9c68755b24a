"""Prefix cache: reuse the KV blocks and GDN states of an earlier prompt that shares a prefix.

Entries sit at the boundaries of prefill pieces (chunk_size tokens each): the entry for boundary p
holds piece p's KV slots of every attention layer (the per-rank shards, still spread over `cp`), the KV
slot positions, the GDN conv + recurrent states after piece p, and the next-token logits there. A prompt
hashes its pieces in a chain (h_p = H(h_{p-1}, tokens of piece p)), so boundary p matches only if every
earlier token matches; restoring boundary p copies the blocks of pieces 0..p back into the slots.
The chain starts from a key of the model's weights fingerprint, dtype, cp, tp, piece size and padded
piece length, so a different model, dtype or cp x tp layout never hits. Entries are evicted least recently
used first to stay within `max_bytes`; using an entry refreshes its whole chain.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax.sharding import REPLICATED


@dataclasses.dataclass
class _Entry:
    kv: tuple           # ("k", "v") [NA, B, C*block, Hkv, hd] sharded over cp: piece p's slots of every attention layer
    kpos: jax.Array     # [B, C*block]
    gdn: dict           # {"conv", "state"} [NG, B, ...] replicated: every GDN layer's state after piece p
    logits: jax.Array   # [B, V] next-token logits after the boundary token (for prompts ending there)
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} must be a non-negative integer")
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._bytes = 0
        self._stats = dict(hits=0, misses=0, tokens_reused=0, evictions=0)

    def stats(self) -> dict:
        return dict(self._stats, bytes_held=self._bytes, entries=len(self._entries))

    # Keys -----------------------------------------------------------------------------------------
    @staticmethod
    def _root(model, piece: int, n_pad: int, batch: int) -> bytes:
        h = hashlib.sha256()
        h.update(model.fingerprint())
        h.update(repr((model.dtype_name, model.cp, model.tp, piece, n_pad, batch)).encode())
        return h.digest()

    def chain(self, model, ids, lengths, piece, n_pad) -> list[tuple[int, bytes]]:
        """Keys of every full piece boundary all rows reach: [(p, key)]. Computed once per prefill."""
        key = self._root(model, piece, n_pad, len(lengths))
        out = []
        for p in range(int(lengths.min()) // piece):
            key = hashlib.sha256(key + np.ascontiguousarray(ids[:, p * piece:(p + 1) * piece], np.int32).tobytes()).digest()
            out.append((p, key))
        return out

    # Store / restore ------------------------------------------------------------------------------
    def store(self, model, chain, n_pad, p, caches, kpos, logits) -> None:
        """Keep boundary p (the end of piece p) of a prompt whose keys are `chain`."""
        if p >= len(chain) or chain[p][1] in self._entries:
            return
        block = n_pad // model.cp
        k, v, kp = model._slot_block_fn(block, kpos.shape[1] // model.cp)(
            caches["k"], caches["v"], kpos, model._place(np.int32(p * block), REPLICATED))
        gdn = {n: jnp.copy(caches[n]) for n in ("conv", "state")}
        entry = _Entry((k, v), kp, gdn, jnp.copy(logits), 0)
        entry.nbytes = sum(a.nbytes for a in jax.tree.leaves((entry.kv, kp, gdn, entry.logits)))
        if entry.nbytes > self.max_bytes:
            return
        self._entries[chain[p][1]] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self._stats["evictions"] += 1

    def restore(self, model, chain, piece, n_pad, caches, kpos):
        """Longest cached boundary of a prompt whose keys are `chain`: returns (pieces restored,
        (caches, kpos, logits)) or (0, None)."""
        found = 0
        for p, key in chain:
            if key not in self._entries:
                break
            found = p + 1
        if found == 0:
            self._stats["misses"] += 1
            return 0, None
        self._stats["hits"] += 1
        self._stats["tokens_reused"] += found * piece * kpos.shape[0]
        block = n_pad // model.cp
        put = model._slot_restore_fn(block, kpos.shape[1] // model.cp)
        k, v = caches["k"], caches["v"]
        for p, key in chain[:found]:
            self._entries.move_to_end(key)
            entry = self._entries[key]
            k, v, kpos = put(k, v, kpos, *entry.kv, entry.kpos, model._place(np.int32(p * block), REPLICATED))
        last = self._entries[chain[found - 1][1]]
        caches = {"k": k, "v": v, **{n: jnp.copy(a) for n, a in last.gdn.items()}}
        return found, (caches, kpos, last.logits)

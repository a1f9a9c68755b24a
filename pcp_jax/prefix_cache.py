"""Prefix cache: reuse the KV blocks and GDN states of an earlier prompt that shares a prefix.

Entries sit at the boundaries of prefill pieces (chunk_size tokens each): the entry for boundary p
holds piece p's KV slots of every attention layer (the per-rank shards, still spread over `cp`), the KV
slot positions, the GDN conv + recurrent states after piece p, and the next-token logits there. A prompt
hashes its pieces in a chain (h_p = H(h_{p-1}, tokens of piece p)), so boundary p matches only if every
earlier token matches; restoring boundary p copies the blocks of pieces 0..p back into the slots.
The chain starts from a key of the model's fingerprint (`fingerprint`: its config and weights), dtype, devices,
cp, tp, piece size, padded piece length and batch, so a different model, dtype, device set or cp x tp layout
never hits. Entries are evicted least recently
used first to stay within `max_bytes`; using an entry refreshes its whole chain.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import numbers
import weakref

import jax
import numpy as np

from pcp_jax.programs import CopyBlock, CopyStates, RestoreBlock

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


@dataclasses.dataclass
class _Entry:
    kv: tuple           # ("k", "v") [NA, B, C*block, Hkv, hd] sharded over cp: piece p's slots of every attention layer
    kpos: jax.Array     # [B, C*block]
    gdn: dict           # {"conv", "state"} [NG, B, ...] replicated: every GDN layer's state after piece p
    logits: jax.Array   # [B, V] next-token logits after the boundary token (for prompts ending there)
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, numbers.Integral) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} must be a non-negative integer (bytes)")
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
        h.update(fingerprint(model))
        devices = [d.id for d in model.mesh.devices.flat]
        h.update(repr((model.dtype_name, devices, model.cp, model.tp, piece, n_pad, batch)).encode())
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
        block, batch, slots = n_pad // model.cp, kpos.shape[0], kpos.shape[1] // model.cp
        k, v, kp = model.programs.get(CopyBlock(batch, block, slots))(
            caches["k"], caches["v"], kpos, model.to_device(np.int32(p * block)))
        conv, state, logits = model.programs.get(CopyStates(batch))(caches["conv"], caches["state"], logits)
        entry = _Entry((k, v), kp, {"conv": conv, "state": state}, logits, 0)
        entry.nbytes = sum(a.nbytes for a in jax.tree.leaves((entry.kv, kp, entry.gdn, entry.logits)))
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
        block, batch, slots = n_pad // model.cp, kpos.shape[0], kpos.shape[1] // model.cp
        put = model.programs.get(RestoreBlock(batch, block, slots))
        k, v = caches["k"], caches["v"]
        for p, key in chain[:found]:
            self._entries.move_to_end(key)
            entry = self._entries[key]
            k, v, kpos = put(k, v, kpos, *entry.kv, entry.kpos, model.to_device(np.int32(p * block)))
        last = self._entries[chain[found - 1][1]]
        conv, state, logits = model.programs.get(CopyStates(batch))(last.gdn["conv"], last.gdn["state"], last.logits)
        return found, ({"k": k, "v": v, "conv": conv, "state": state}, kpos, logits)

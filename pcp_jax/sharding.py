"""Sharding, declared once: logical axis names map to mesh axes.

Model and engine code name logical axes (`batch`, `sequence`, `kv_slots`, ...); only this table and the
per-shard context name the mesh axes `cp` and `tp`. Prompt tokens (in zigzag order) and KV-cache slots are
split over `cp`; heads (of the KV cache and the GDN states) and conv channels over `tp`; the weights' split
is in pcp_jax/parallel/tensor.py; everything else (logits of one position, token ids) is replicated.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec

CP_AXIS = "cp"
TP_AXIS = "tp"


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    batch: str | None = None
    sequence: str | None = CP_AXIS   # prompt tokens, zigzag order
    kv_slots: str | None = CP_AXIS   # slots of the KV cache of full-attention layers
    layers: str | None = None        # the leading axis of stacked caches (one entry per layer of a kind)
    heads: str | None = TP_AXIS      # KV heads of the cache, value heads of GDN states
    channels: str | None = TP_AXIS   # GDN conv channels (rank-major [q | k | v] blocks: parallel/tensor.py)
    vocab: str | None = None

    def spec(self, *logical: str | None) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry these logical names (None: replicated).
        Raises ValueError if two dimensions would be split over the same mesh axis."""
        mesh_axes = []
        for name in logical:
            if name is not None and not hasattr(self, name):
                raise ValueError(f"unknown logical axis {name!r}; known: {[f.name for f in dataclasses.fields(self)]}")
            mesh_axes.append(None if name is None else getattr(self, name))
        used = [a for a in mesh_axes if a is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"logical axes {logical} put two dimensions on one mesh axis: {mesh_axes}")
        return PartitionSpec(*mesh_axes)


RULES = ShardingRules()
REPLICATED = PartitionSpec()
TOKENS = RULES.spec("batch", "sequence")     # [B, N] prompt ids, [B, N, V] logits
KV_SLOTS = RULES.spec("batch", "kv_slots")   # [B, S] slot positions
STACKED_KV = RULES.spec("layers", "batch", "kv_slots", "heads")   # [n_attention, B, S, Hkv, hd] K/V of every attention layer
CONV = RULES.spec("layers", "batch", None, "channels")   # [n_gdn, B, K-1, conv_dim]
STATE = RULES.spec("layers", "batch", "heads")           # [n_gdn, B, Hv, dk, dv]
CACHES = {"k": STACKED_KV, "v": STACKED_KV, "conv": CONV, "state": STATE}  # model.empty_caches

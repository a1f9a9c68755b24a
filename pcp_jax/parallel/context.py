"""What per-shard model code knows about its place in the mesh.

Built inside the `shard_map`'d function: static fields (axis names, C, T, strategies) come
from the engine, traced fields (ranks, positions, row lengths) from the inputs. With cp == 1 every
collective over `cp` is the identity, and with tp == 1 every one over `tp`: there is one code path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

GDN_STRATEGIES = ("auto", "batch", "sequence")


@dataclasses.dataclass(frozen=True)
class ShardContext:
    axis: str            # mesh axis name, "cp"
    cp: int              # number of ranks C
    gdn_strategy: str    # "batch" | "sequence" (resolved, never "auto")
    kernels: str         # "auto" | "jnp" | "gpu"
    rank: jax.Array      # scalar int32, this shard's index on `axis`
    positions: jax.Array  # [B, T] int32 global positions of the local tokens
    lengths: jax.Array   # [B] int32 valid tokens per row (prompt + cache); positions >= length are padding
    tp: int = 1          # number of tensor-parallel ranks T (weights split: pcp_jax/parallel/tensor.py)
    tp_axis: str = "tp"
    tp_rank: jax.Array | int = 0  # scalar int32, this shard's index on `tp_axis`
    capture: jax.Array | None = None  # [K] int32 positions whose GDN states a prefill keeps (-1 none), or None

    @property
    def valid(self):
        """[B, T] bool: which local tokens are real (not padding)."""
        return self.positions < self.lengths[:, None]

    def all_gather(self, x, axis: int = 0, tiled: bool = False):
        if self.cp == 1:
            return x if tiled else jnp.expand_dims(x, axis)
        return jax.lax.all_gather(x, self.axis, axis=axis, tiled=tiled)

    def psum(self, x):
        return x if self.cp == 1 else jax.lax.psum(x, self.axis)

    def pmin(self, x):
        return x if self.cp == 1 else jax.lax.pmin(x, self.axis)

    def shift(self, x, offset: int):
        """Send x to rank (r + offset) mod C; returns what rank (r - offset) mod C sent."""
        if self.cp == 1:
            return x
        perm = [(i, (i + offset) % self.cp) for i in range(self.cp)]
        return jax.lax.ppermute(x, self.axis, perm)

    def tp_sum(self, x):
        """Sum of the partial results of the `tp` ranks (a block's one reduction)."""
        return x if self.tp == 1 else jax.lax.psum(x, self.tp_axis)

    def tp_gather(self, x, axis: int = -1):
        """The `tp` ranks' blocks of x concatenated along `axis` (e.g. vocabulary shards of logits)."""
        return x if self.tp == 1 else jax.lax.all_gather(x, self.tp_axis, axis=axis % x.ndim, tiled=True)

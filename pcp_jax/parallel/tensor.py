"""Tensor parallelism over the mesh axis `tp`: how each weight is split, and what one shard's config is.

Megatron style, one reduction per block (the decoder layer sums the token mixer's and the channel mixer's
partial outputs over `tp`):
- full attention: query heads split (q_proj columns, per head [query | gate]; o_proj rows); KV heads split
  where T divides them, else each of the Hkv heads is repeated T/Hkv times so that every rank holds one
  (rank r needs KV head r // (T/Hkv): its query heads all read that one);
- Gated DeltaNet: value heads split with their key heads (key heads repeated like KV heads when fewer than
  T), in_proj_z/b/a, A_log, dt_bias, out_proj rows; in_proj_qkv and conv_weight columns are reordered
  rank-major, [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...], so that rank r's block is its own [q | k | v]:
  the per-shard code is the unsplit code with smaller head counts;
- MLP and shared expert: intermediate split; MoE experts split (expert parallel, E/T whole experts each);
- embedding rows and LM head columns split over the vocabulary;
- norms, router and shared-expert gate replicated.

Which axis of each contract tensor is split, and in which layout, is declared once in pcp_jax.weights; this
module realizes the layouts (`layout_indexes`) and gives each tensor's shape on one rank (`device_shapes`).
The checkpoint stays as it is on disk: a `Placement` says how one device parameter is built from contract
tensors (docs/convert.md), and `place_params` builds every device parameter shard by shard from a
`TensorSource`, reading only the blocks its devices hold. Stacked parameters (`group.{j}.<leaf>`: the weights
of layers j, p+j, 2p+j, ... of a `LayerPlan`) are built here too, so stacking never copies a tensor.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pcp_jax.config import ModelConfig
from pcp_jax.sharding import TP_AXIS
from pcp_jax.weights import declare, param_shapes


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError, naming every field at fault, if `cfg` cannot be split over `tp` ranks."""
    if not (isinstance(tp, numbers.Integral) and not isinstance(tp, bool) and tp >= 1):
        raise ValueError(f"tp={tp!r} must be a positive integer")
    if tp == 1:
        return
    divides = {"num_heads": cfg.num_heads, "linear_num_value_heads": cfg.linear_num_value_heads,
               "vocab_size": cfg.vocab_size}
    if cfg.is_moe:
        divides["num_experts"] = cfg.num_experts
        if cfg.shared_expert_intermediate_size:
            divides["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    else:
        divides["intermediate_size"] = cfg.intermediate_size
    bad = [f"{k}={v}" for k, v in divides.items() if v % tp]
    bad += [f"{k}={v} (neither a multiple nor a divisor of tp)" for k, v in
            (("num_kv_heads", cfg.num_kv_heads), ("linear_num_key_heads", cfg.linear_num_key_heads))
            if v % tp and tp % v]
    if bad:
        raise ValueError(f"tp={tp} does not split this model: {', '.join(bad)} must be divisible by {tp}")


def _heads_on_mesh(heads: int, tp: int) -> int:
    """Heads the mesh holds for `heads` shared heads: repeated up to tp when fewer (one per rank)."""
    return max(heads, tp)


def heads_per_device(heads: int, tp: int) -> int:
    """KV heads (or GDN key heads) one tp rank holds: heads/tp, or one repeated head where heads < tp."""
    return _heads_on_mesh(heads, tp) // tp


def mesh_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of the arrays as they lie on the mesh (global shapes): KV heads and GDN key heads
    repeated up to `tp` where fewer. Equal to `cfg` when nothing is repeated."""
    return dataclasses.replace(cfg, num_kv_heads=_heads_on_mesh(cfg.num_kv_heads, tp),
                               linear_num_key_heads=_heads_on_mesh(cfg.linear_num_key_heads, tp))


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config one `tp` shard computes with: head, intermediate and vocabulary counts divided by `tp`.
    `num_experts` stays the routed total (the router is replicated); a shard's experts are its weights'
    leading axis."""
    if tp == 1:
        return cfg
    check_tp(cfg, tp)
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // tp, num_kv_heads=heads_per_device(cfg.num_kv_heads, tp),
        linear_num_key_heads=heads_per_device(cfg.linear_num_key_heads, tp),
        linear_num_value_heads=cfg.linear_num_value_heads // tp,
        intermediate_size=cfg.intermediate_size // tp if not cfg.is_moe else cfg.intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // tp,
        vocab_size=cfg.vocab_size // tp)


def _repeated_heads(heads: int, tp: int) -> np.ndarray:
    """Source head of every head on the mesh: identity, or each head repeated tp/heads times."""
    return np.arange(_heads_on_mesh(heads, tp)) // max(tp // heads, 1)


def _columns(heads: np.ndarray, size: int, base: int = 0) -> np.ndarray:
    """Columns of the given heads of `size` each, in order, starting at `base`."""
    return (base + heads[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def kv_column_index(cfg: ModelConfig, tp: int) -> np.ndarray | None:
    """k_proj/v_proj columns on the mesh -> source columns (None when no head is repeated)."""
    if cfg.num_kv_heads >= tp:
        return None
    return _columns(_repeated_heads(cfg.num_kv_heads, tp), cfg.head_dim)


def qkv_column_index(cfg: ModelConfig, tp: int) -> np.ndarray | None:
    """in_proj_qkv/conv_weight columns on the mesh -> source columns: rank-major [q_r | k_r | v_r] with key
    heads repeated where fewer than tp (None for tp == 1, where the order is the source's)."""
    if tp == 1:
        return None
    dk, dv, kd = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_key_dim
    keys = _repeated_heads(cfg.linear_num_key_heads, tp).reshape(tp, -1)
    values = np.arange(cfg.linear_num_value_heads).reshape(tp, -1)
    return np.concatenate([np.concatenate([_columns(keys[r], dk), _columns(keys[r], dk, kd),
                                           _columns(values[r], dv, 2 * kd)]) for r in range(tp)])


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """How one device parameter is made. `name`: a contract name (`layers.13.attn.q_proj`) or a stacked one
    (`group.1.attn.q_proj`: the contract tensors `sources`, stacked on a new leading axis). `split`: the
    axis of a source tensor split over `tp` (None: replicated); `index`: along that axis, the source
    position of each position on the mesh (None: the same); `shape`: the global shape on the mesh."""
    name: str
    sources: tuple[str, ...]
    stacked: bool
    source_shape: tuple[int, ...]
    split: int | None
    index: np.ndarray | None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.source_shape)
        if self.index is not None:
            shape[self.split] = len(self.index)
        return ((len(self.sources),) if self.stacked else ()) + tuple(shape)

    def spec(self, tp: int) -> PartitionSpec:
        axes = [None] * len(self.shape)
        if self.split is not None and tp > 1:
            axes[self.split + self.stacked] = TP_AXIS
        return PartitionSpec(*axes)

    def block(self, idx: tuple[slice, ...], read: Callable[[str, tuple[slice, ...]], np.ndarray]) -> np.ndarray:
        """The block `idx` (slices of `shape`) of this parameter, reading only that block of the sources:
        `read(contract_name, slices)` returns those slices of one contract tensor."""
        idx = tuple(idx) + (slice(None),) * (len(self.shape) - len(idx))
        names = self.sources[idx[0]] if self.stacked else self.sources
        per_source = idx[1:] if self.stacked else idx
        blocks = [self._source_block(name, per_source, read) for name in names]
        return np.stack(blocks) if self.stacked else blocks[0]

    def _source_block(self, name, idx, read):
        if self.index is None:
            return np.asarray(read(name, idx))
        wanted = self.index[idx[self.split]]
        runs = np.split(wanted, np.flatnonzero(np.diff(wanted) != 1) + 1)  # contiguous runs of source positions
        parts = []
        for run in runs:
            part_idx = list(idx)
            part_idx[self.split] = slice(int(run[0]), int(run[-1]) + 1)
            parts.append(np.asarray(read(name, tuple(part_idx))))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.split)


def layout_indexes(cfg: ModelConfig, tp: int) -> dict[str, np.ndarray | None]:
    """Per layout of pcp_jax.weights: along the split axis, the source position of each position on the mesh
    (None: as stored)."""
    return {"plain": None, "kv_heads": kv_column_index(cfg, tp), "gdn_qkv": qkv_column_index(cfg, tp)}


def device_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """The shape of every contract tensor on one tp rank: its split axis on the mesh (after the layout's
    repeated heads) divided by tp; replicated tensors whole. ValueError if tp does not split `cfg`."""
    check_tp(cfg, tp)
    indexes = layout_indexes(cfg, tp)
    out = {}
    for name, w in declare(cfg).items():
        shape = list(w.shape)
        if w.tp is not None and tp > 1:
            index = indexes[w.tp.layout]
            shape[w.tp.axis] = (shape[w.tp.axis] if index is None else len(index)) // tp
        out[name] = tuple(shape)
    return out


def placements(cfg: ModelConfig, tp: int, period: int, groups: int) -> list[Placement]:
    """Every device parameter of `cfg` split over `tp`, for a layer plan of `groups` scanned groups of
    `period` layers (layers past groups·period stay flat), in streaming order."""
    check_tp(cfg, tp)
    indexes = layout_indexes(cfg, tp)
    scanned = groups * period
    out = []
    for name, w in declare(cfg).items():
        split = None if w.tp is None else w.tp.axis
        index = None if w.tp is None else indexes[w.tp.layout]
        if not name.startswith("layers."):
            out.append(Placement(name, (name,), False, w.shape, split, index))
            continue
        _, i, leaf = name.split(".", 2)
        i = int(i)
        if i < scanned and i >= period:
            continue  # made as part of group i % period
        sources = tuple(f"layers.{g * period + i}.{leaf}" for g in range(groups)) if i < scanned else (name,)
        device_name = f"group.{i}.{leaf}" if i < scanned else name
        out.append(Placement(device_name, sources, i < scanned, w.shape, split, index))
    return out


class DictSource:
    """A `TensorSource` over flat contract params in memory {name: array}. `consume`: drop each tensor
    once every parameter made from it is placed (so no weight is held twice)."""

    def __init__(self, params: dict, consume: bool = False):
        self.params, self.consume = params, consume

    def names(self) -> Iterable[str]:
        return self.params.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self.params[name]))

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.params[name][idx])

    def release(self, name: str) -> None:
        if self.consume:
            self.params.pop(name, None)


def check_source(cfg: ModelConfig, source) -> None:
    """Every contract tensor present with its shape, and nothing else (ValueError otherwise)."""
    expected = param_shapes(cfg)
    names = set(source.names())
    extra = sorted(names - set(expected))
    if extra:
        raise ValueError(f"unexpected parameters for this config: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    missing = [n for n in expected if n not in names]
    if missing:
        raise ValueError(f"missing parameter {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        if tuple(source.shape(name)) != tuple(shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(source.shape(name))}; this config expects {tuple(shape)}")


def place_params(cfg: ModelConfig, mesh, source, dtype, period: int, groups: int) -> dict[str, jax.Array]:
    """Every device parameter (see `placements`) as a global array on `mesh` (axes "cp" and "tp"; no "tp"
    axis means tp = 1), split over `tp` and replicated over `cp`, in `dtype`. Each distinct block is read
    once from `source` (which needs names/shape/read, optionally release, or `place(placement, sharding,
    dtype)` to make the array itself) and copied to the devices that hold it; a process reads only the blocks of its own devices. Host memory holds one parameter's blocks
    at a time."""
    tp = mesh.shape.get(TP_AXIS, 1)
    check_source(cfg, source)
    dtype = np.dtype(dtype)
    out = {}
    for p in placements(cfg, tp, period, groups):
        cache: dict = {}

        def block(idx, p=p, cache=cache):
            key = tuple((s.start, s.stop, s.step) for s in idx)
            if key not in cache:
                cache[key] = np.asarray(p.block(idx, source.read), dtype)
            return cache[key]

        sharding = NamedSharding(mesh, p.spec(tp))
        if hasattr(source, "place"):  # a source that makes device arrays itself (weights.RandomSource)
            out[p.name] = source.place(p, sharding, dtype)
        else:
            out[p.name] = jax.make_array_from_callback(p.shape, sharding, block)
        cache.clear()
        if hasattr(source, "release"):
            for s in p.sources:
                source.release(s)
    return out

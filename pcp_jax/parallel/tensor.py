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
FP8 weights (contract tensors with a `<name>.scale`, pcp_jax.weights.contract_shapes) are placed with their
block scales (`fp8_placements`): a rank holds the scales of the 128x128 blocks its share touches, repeated
where a split cuts a block (then the scale's block is the largest divisor of 128 that divides the share:
64 for a rank holding half a block); a split that would put two blocks' elements in one such block is
refused in one line. `place_params` keeps them as `pcp_jax.fp8.Fp8Param`s (output-major, as the checkpoint
stores them) or dequantizes them on the devices (pcp_jax.fp8 says when).
The checkpoint stays as it is on disk: a `Placement` says how one device parameter is built from contract
tensors (docs/convert.md), and `place_params` builds every device parameter shard by shard from a
`TensorSource`, reading only the blocks its devices hold. Stacked parameters (`group.{j}.<leaf>`: the weights
of layers j, p+j, 2p+j, ... of a `LayerPlan`) are built here too, so stacking never copies a tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pcp_jax.config import ModelConfig
from pcp_jax.fp8 import Fp8Param
from pcp_jax.inputs import is_int
from pcp_jax.sharding import TP_AXIS
from pcp_jax.weights import SCALE, contract_shapes, declare

SCALE_BLOCK = 128  # elements per block scale along each axis in the released checkpoints
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)  # every e4m3 bit pattern's value


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError, naming every field at fault, if `cfg` cannot be split over `tp` ranks."""
    if not (is_int(tp) and tp >= 1):
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
    position of each position on the mesh (None: the same); `transposed`: the device holds each source with its
    last two axes swapped (FP8 weights, output-major); `shape`: the global shape on the mesh."""
    name: str
    sources: tuple[str, ...]
    stacked: bool
    source_shape: tuple[int, ...]
    split: int | None
    index: np.ndarray | None
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.source_shape)
        if self.index is not None:
            shape[self.split] = len(self.index)
        if self.transposed:
            shape[-2], shape[-1] = shape[-1], shape[-2]
        return ((len(self.sources),) if self.stacked else ()) + tuple(shape)

    def spec(self, tp: int) -> PartitionSpec:
        axes = [None] * len(self.shape)
        if self.split is not None and tp > 1:
            axis, last = self.split, len(self.source_shape) - 1
            if self.transposed and axis >= last - 1:
                axis = 2 * last - 1 - axis  # the last two axes swap
            axes[axis + self.stacked] = TP_AXIS
        return PartitionSpec(*axes)

    def block(self, idx: tuple[slice, ...], read: Callable[[str, tuple[slice, ...]], np.ndarray]) -> np.ndarray:
        """The block `idx` (slices of `shape`) of this parameter, reading only that block of the sources:
        `read(contract_name, slices)` returns those slices of one contract tensor."""
        idx = tuple(idx) + (slice(None),) * (len(self.shape) - len(idx))
        names = self.sources[idx[0]] if self.stacked else self.sources
        per_source = idx[1:] if self.stacked else idx
        if self.transposed:
            per_source = per_source[:-2] + (per_source[-1], per_source[-2])
        blocks = [self._source_block(name, per_source, read) for name in names]
        if self.transposed:
            blocks = [np.swapaxes(b, -1, -2) for b in blocks]
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


class ScaleSplitError(ValueError):
    """A tp split that would put elements of two scale blocks under one scale of a rank (`fp8_placements`)."""


def fp8_placements(p: Placement, tp: int, transposed: bool) -> tuple[Placement, Placement, tuple[int, int]]:
    """The placements of an FP8 weight `p` (every source stored as e4m3 with a `<source>.scale`): its values (as
    `p`, `transposed` or not) and its block scale, and the block of the values' device layout that one scale
    covers. Along an axis split over tp, a rank's share of S positions gets scales for blocks of
    gcd(128, S) positions, each the scale of the 128-block of the source holding them (repeated where a share
    cuts a block); other axes keep the checkpoint's 128-blocks (the last one may be partial). ScaleSplitError
    when a layout (repeated or reordered heads) puts positions of two source blocks into one block of a share."""
    last = len(p.source_shape) - 1
    block = [SCALE_BLOCK, SCALE_BLOCK]
    index = None
    if p.split is not None and p.split >= last - 1 and tp > 1:
        positions = np.arange(p.source_shape[p.split]) if p.index is None else p.index
        size = math.gcd(SCALE_BLOCK, len(positions) // tp)
        blocks = positions.reshape(-1, size) // SCALE_BLOCK
        if (blocks != blocks[:, :1]).any():
            raise ScaleSplitError(f"tp={tp} cannot split the FP8 weight {p.sources[0]}: a rank's share of its axis "
                                  f"{p.split} mixes elements of different {SCALE_BLOCK}x{SCALE_BLOCK} scale blocks; "
                                  f"use a tp whose shares are whole heads of {SCALE_BLOCK}, or weights='dequantize'")
        block[p.split - (last - 1)] = size
        if size != SCALE_BLOCK or p.index is not None:
            index = blocks[:, 0]
    *lead, rows, cols = p.source_shape
    scale_shape = (*lead, -(-rows // SCALE_BLOCK), -(-cols // SCALE_BLOCK))
    scale = Placement(p.name + SCALE, tuple(s + SCALE for s in p.sources), p.stacked, scale_shape, p.split, index,
                      transposed)
    return dataclasses.replace(p, transposed=transposed), scale, (block[1], block[0]) if transposed else tuple(block)


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


def fp8_scale_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """The shape of the block scale of every matrix declared with a BlockScale on one tp rank, when kept in FP8
    (`fp8_placements`; ScaleSplitError where tp splits one inside its scale blocks)."""
    declared, out = declare(cfg), {}
    for p in placements(cfg, tp, 1, 0):
        if declared[p.name].scale is not None:
            scale = fp8_placements(p, tp, transposed=False)[1]
            shape = list(scale.shape)
            if scale.split is not None and tp > 1:
                shape[scale.split] //= tp
            out[p.name] = tuple(shape)
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


def check_source(cfg: ModelConfig, source) -> set[str]:
    """Every contract tensor present with its shape, the block scale of each FP8 one (named `<name>.scale`), and
    nothing else (ValueError otherwise). Returns the names of the FP8 tensors."""
    names = set(source.names())
    fp8 = {n[: -len(SCALE)] for n in names if n.endswith(SCALE)}
    expected = contract_shapes(cfg, fp8 & set(declare(cfg)))
    extra = sorted(names - set(expected))
    if extra:
        raise ValueError(f"unexpected parameters for this config: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    missing = [n for n in expected if n not in names]
    if missing:
        raise ValueError(f"missing parameter {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        if tuple(source.shape(name)) != tuple(shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(source.shape(name))}; this config expects {tuple(shape)}")
    return fp8


def dequantized_block(read, name: str, idx: tuple[slice, ...]) -> np.ndarray:
    """Block `idx` of the FP8 contract tensor `name`, dequantized on the host: values · scale of the 128x128 block
    holding each element, in float32 (the product transformers' dequantizer computes). `read(name, slices)`
    reads a contract tensor; only the scales of the blocks `idx` touches are read."""
    values = np.asarray(read(name, idx))
    shape = values.shape
    lead, (r, c) = idx[:-2], idx[-2:]
    r0, c0 = (r.start or 0), (c.start or 0)
    b_rows = slice(r0 // SCALE_BLOCK, -(-(r0 + shape[-2]) // SCALE_BLOCK))
    b_cols = slice(c0 // SCALE_BLOCK, -(-(c0 + shape[-1]) // SCALE_BLOCK))
    scale = np.asarray(read(name + SCALE, (*lead, b_rows, b_cols)), np.float32)
    scale = np.repeat(np.repeat(scale, SCALE_BLOCK, axis=-2), SCALE_BLOCK, axis=-1)
    scale = scale[..., r0 - b_rows.start * SCALE_BLOCK:, c0 - b_cols.start * SCALE_BLOCK:][..., :shape[-2], :shape[-1]]
    return _E4M3_VALUES[values.view(np.uint8)] * scale


def _from_blocks(p: Placement, sharding, dtype, read) -> jax.Array:
    """The device parameter `p` on `sharding` in `dtype`, each distinct block read once with `read`."""
    cache: dict = {}

    def block(idx):
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in cache:
            cache[key] = np.asarray(p.block(idx, read), dtype)
        return cache[key]

    return jax.make_array_from_callback(p.shape, sharding, block)


def _place_fp8(p: Placement, source, mesh, tp: int, keep: bool, dtype) -> jax.Array | Fp8Param:
    """The FP8 weight `p`: its values and scales placed (`fp8_placements`), kept as an Fp8Param (`keep`) or
    dequantized on the devices into `dtype` (the contract layout of `p`)."""
    values, scale, block = fp8_placements(p, tp, transposed=keep)
    shardings = (NamedSharding(mesh, values.spec(tp)), NamedSharding(mesh, scale.spec(tp)))
    if hasattr(source, "place_fp8"):  # a source that makes device arrays itself (weights.RandomSource)
        v, s = source.place_fp8(values, scale, block, shardings)
    else:
        v = _from_blocks(values, shardings[0], E4M3, source.read)
        s = _from_blocks(scale, shardings[1], np.float32, source.read)
    if keep:
        return Fp8Param(v, s, block)
    from pcp_jax.kernels.fp8.reference import dequantize

    run = jax.jit(functools.partial(dequantize, block=block, dtype=dtype),
                  out_shardings=NamedSharding(mesh, p.spec(tp)))
    return run(v, s)


def place_params(cfg: ModelConfig, mesh, source, dtype, period: int, groups: int, *, fp8: bool = False
                 ) -> dict[str, jax.Array | Fp8Param]:
    """Every device parameter (see `placements`) as a global array on `mesh` (axes "cp" and "tp"; no "tp"
    axis means tp = 1), split over `tp` and replicated over `cp`, in `dtype`. Each distinct block is read
    once from `source` (which needs names/shape/read, optionally release, or `place(placement, sharding,
    dtype)` and `place_fp8` to make the arrays itself) and copied to the devices that hold it; a process reads
    only the blocks of its own devices. Host memory holds one parameter's blocks at a time.
    FP8 weights of the source (those with a `<name>.scale`): with `fp8`, those declared with a BlockScale whose
    every stacked source is FP8 become `Fp8Param`s (ScaleSplitError where tp splits one inside its scale
    blocks); every other one is dequantized (values · scale in fp32, rounded once to `dtype`): on the devices
    when all of a parameter's sources are FP8, on the host block by block when only some are (a stack mixing
    FP8 and 16-bit layers) or when tp splits it inside its scale blocks."""
    tp = mesh.shape.get(TP_AXIS, 1)
    quantized = check_source(cfg, source)
    declared = declare(cfg)
    dtype = np.dtype(dtype)
    read = source.read if not quantized else (
        lambda name, idx: dequantized_block(source.read, name, idx) if name in quantized else source.read(name, idx))
    out = {}
    for p in placements(cfg, tp, period, groups):
        sharding = NamedSharding(mesh, p.spec(tp))
        if all(s in quantized for s in p.sources):
            keep = fp8 and declared[p.sources[0]].scale is not None
            try:
                out[p.name] = _place_fp8(p, source, mesh, tp, keep, dtype)
            except ScaleSplitError:
                if keep:
                    raise
                out[p.name] = _from_blocks(p, sharding, dtype, read)
        elif hasattr(source, "place"):  # a source that makes device arrays itself (weights.RandomSource)
            out[p.name] = source.place(p, sharding, dtype)
        else:
            out[p.name] = _from_blocks(p, sharding, dtype, read)
        if hasattr(source, "release"):
            for s in p.sources:
                source.release(s)
                if s in quantized:
                    source.release(s + SCALE)
    return out

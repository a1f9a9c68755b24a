"""Sliced readers of the two checkpoint kinds: blocks of flat params without reading whole tensors.

    SafetensorsSource(hf_dir, cfg=None, dtype="bfloat16")   a Hugging Face folder
    OrbaxSource(out_dir, *, verify=None, dtype=None)        a folder made by `convert`

Both are `TensorSource`s (pcp_jax.parallel.tensor): `names()` the flat-param names of the config (docs/convert.md;
with an FP8 checkpoint's scales `<name>.scale`, pcp_jax.weights.contract_shapes),
`shape(name)`, `read(name, slices) -> np.ndarray` that block of the tensor (C-contiguous, owned); OrbaxSource
also `release(name)`, which closes the tensor's store once it is placed (a SafetensorsSource keeps nothing
between reads). `pcp_jax.parallel.tensor.place_params` builds each device's
shard from them, so a process reads only the blocks its own devices hold and never the whole model.

SafetensorsSource: every block equals `read_hf_params(hf_dir, cfg, dtype)[name][slices]` bit for bit (same
casts; FP8 values stay e4m3, their scales float32). The folder is checked as `read_hf_params` checks it, from the headers, when the source is made (a
stored tied lm_head is compared with the embedding then, in blocks), and every block read must hold finite
values only (a ConvertError names the HF tensor otherwise). A read maps the HF tensor's bytes and
copies only the block out of the mapping, through the same view the converter takes (transpose, the gate or
up half of a fused gate_up_proj, the conv reshape); for experts stored one tensor per expert only the
experts of the block are mapped. Host memory: the block, plus the mapped file pages the block touches.
Pages are file-backed (the kernel can drop them) and unmapped after each read. A block of rows of a
transposed HF tensor (e.g. o_proj or down_proj split over `tp`) is a set of columns on disk, so its pages
interleave with the other ranks' and the page cache may read the whole tensor; the process still holds
only its block.

OrbaxSource: reads each block with TensorStore from the stored array (Orbax's own read spec), so only the
chunks overlapping the block are read (arrays above 64 MiB are stored in chunks of at most 64 MiB; smaller
ones are one chunk, decoded whole for a block, transiently). Integrity as `load_orbax`: pcp_config.json is
checked when the source is made; the files of a unit are compared with their recorded sha256 before any of
its tensors is opened (unless verify=False or PCP_JAX_SKIP_VERIFY=1), and the unit's names and shapes with
the stored config. `weights_digest` is the digest recorded at conversion (weights in the stored dtype).
Reads are in the stored dtype unless `dtype` asks for a cast (never for FP8 weights and their scales). Values are not checked for NaN here: a
conversion refuses non-finite weights, and the digests prove the files are what it wrote.
"""

from __future__ import annotations

import os

import numpy as np

from pcp_jax.config import ModelConfig

from .digest import verify_files
from .errors import ConvertError
from .hf_loader import check_finite, copy_into, open_hf_checkpoint, resolve_dtype, source_dtype
from .hf_names import unit_of
from .orbax_io import PARAMS_DIR, _read_meta, one_line, read_dtype, stored_shapes, verify_default
from .safetensors_io import read_tensor


def _as_index(slices, ndim: int) -> tuple[slice, ...]:
    """`slices` padded with whole axes to `ndim` slices."""
    slices = tuple(slices)
    if len(slices) > ndim or not all(isinstance(s, slice) for s in slices):
        raise ValueError(f"expected at most {ndim} slices, got {slices!r}")
    return slices + (slice(None),) * (ndim - len(slices))


def _block_shape(shape, index) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


class SafetensorsSource:
    """Blocks of the flat params of a Hugging Face folder, read straight from its safetensors files."""

    def __init__(self, hf_dir: str | os.PathLike, cfg: ModelConfig | None = None, dtype="bfloat16"):
        self.dtype = resolve_dtype(dtype)
        self.cfg, self._ckpt, self._plan = open_hf_checkpoint(hf_dir, cfg)

    def names(self):
        return self._plan.sources.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source(name).shape

    def read(self, name: str, slices=()) -> np.ndarray:
        source = self._source(name)
        index = _as_index(slices, len(source.shape))
        out = np.empty(_block_shape(source.shape, index), source_dtype(source, self.dtype))
        if source.pieces[0].expert is None:  # one HF tensor (fused experts included)
            piece = source.pieces[0]
            copy_into(out, piece.transform.apply(self._map(piece.hf_name))[index])
            check_finite(out, f"{self._ckpt.folder}: tensor {piece.hf_name}")
            return out
        for k, expert in enumerate(range(len(source.pieces))[index[0]]):  # only the experts of the block
            piece = source.pieces[expert]
            copy_into(out[k], piece.transform.apply(self._map(piece.hf_name))[index[1:]])
            check_finite(out[k], f"{self._ckpt.folder}: tensor {piece.hf_name}")
        return out

    def _source(self, name: str):
        try:
            return self._plan.sources[name]
        except KeyError:
            raise KeyError(f"{self._ckpt.folder} has no parameter {name!r}") from None

    def _map(self, hf_name: str) -> np.ndarray:
        return read_tensor(self._ckpt.tensors[hf_name])


class OrbaxSource:
    """Blocks of the flat params of a converted folder, read with TensorStore from the stored arrays."""

    def __init__(self, path: str | os.PathLike, *, verify: bool | None = None, dtype=None):
        self.path = os.path.abspath(os.fspath(path))  # TensorStore needs absolute paths
        self.verify = verify_default() if verify is None else verify
        meta, self.cfg = _read_meta(self.path, self.verify)
        self.stored_dtype = resolve_dtype(meta["dtype"])
        self.dtype = resolve_dtype(dtype if dtype is not None else meta["dtype"])
        self.weights_digest = bytes.fromhex(meta["weights_digest"])
        self._integrity = meta["integrity"]["units"]
        self._meta = meta
        self._shapes = stored_shapes(self.path, meta, self.cfg)
        self._units: dict[str, list[str]] = {}
        for name in self._shapes:
            self._units.setdefault(unit_of(name), []).append(name)
        if sorted(meta["units"]) != sorted(self._units):
            raise ConvertError(f"{self.path}: stored units {meta['units'][:5]}... do not match its config "
                               f"(expected {list(self._units)[:5]}...)")
        if self.verify:
            verify_files(self.path, meta["integrity"]["files"], f"the files copied into {self.path}")
        self._checked: dict[str, bool] = {}  # unit -> use_zarr3, once its files and metadata are checked
        self._stores: dict = {}              # name -> open TensorStore
        self._context = None

    def names(self):
        return self._shapes.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise KeyError(f"{self.path} has no parameter {name!r}")
        self._check_unit(unit_of(name))
        return self._shapes[name]

    def read(self, name: str, slices=()) -> np.ndarray:
        store = self._open(name)
        index = _as_index(slices, len(self._shapes[name]))
        try:
            block = store[index].read().result()
        except Exception as e:  # noqa: BLE001 - TensorStore reports truncated/corrupt chunks as bare exceptions
            raise ConvertError(f"cannot restore {self._unit_path(unit_of(name))}: {one_line(e)}") from e
        return np.ascontiguousarray(block).astype(read_dtype(self._meta, name, self.dtype), copy=False)

    def release(self, name: str) -> None:
        self._stores.pop(name, None)

    def _unit_path(self, unit: str) -> str:
        return os.path.join(self.path, PARAMS_DIR, unit)

    def _check_unit(self, unit: str) -> bool:
        """Verify the unit's files (once), then its names and shapes from Orbax's metadata; returns
        whether it is stored as zarr3."""
        if unit in self._checked:
            return self._checked[unit]
        import orbax.checkpoint as ocp
        from etils import epath

        unit_path = self._unit_path(unit)
        if self.verify:
            verify_files(unit_path, self._integrity[unit], f"unit {unit!r} of {self.path}")
        try:
            metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(unit_path))
            tree = dict(metadata.tree)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore report unreadable metadata as bare exceptions
            raise ConvertError(f"cannot restore {unit_path}: {one_line(e)}") from e
        names = self._units[unit]
        if sorted(tree) != sorted(names):
            raise ConvertError(f"{unit_path} holds {sorted(tree)}, expected {sorted(names)}")
        for n in names:
            if tuple(tree[n].shape) != self._shapes[n]:
                raise ConvertError(f"{unit_path}: {n} has shape {tuple(tree[n].shape)}, expected {self._shapes[n]}")
        self._checked[unit] = bool(metadata.use_zarr3)
        return self._checked[unit]

    def _open(self, name: str):
        if name in self._stores:
            return self._stores[name]
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from etils import epath

        if name not in self._shapes:
            raise KeyError(f"{self.path} has no parameter {name!r}")
        unit = unit_of(name)
        use_zarr3 = self._check_unit(unit)
        if self._context is None:
            self._context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self._unit_path(unit)),
                                           use_zarr3=use_zarr3, is_ocdbt_checkpoint=True, ts_context=self._context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
        try:
            store = ts.open(spec, context=self._context, read=True).result()
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"cannot restore {self._unit_path(unit)}: {one_line(e)}") from e
        if tuple(store.shape) != self._shapes[name]:
            raise ConvertError(f"{self._unit_path(unit)}: {name} has shape {tuple(store.shape)}, "
                               f"expected {self._shapes[name]}")
        self._stores[name] = store
        return store

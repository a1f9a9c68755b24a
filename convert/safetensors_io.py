"""Our own safetensors reader: the header is parsed and validated up front, tensors are memory-mapped on demand.

File format (huggingface/safetensors): an 8-byte little-endian unsigned header length N, then N bytes of
UTF-8 JSON `{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`,
then the data section. Offsets are relative to the data section; tensors are C-contiguous, little-endian.

Contract:
- Opening a file validates every header entry against the file size (dtype known, shape non-negative,
  `end - begin == numel * itemsize`, inside the data section, no two tensors overlapping), so a truncated
  or corrupt file fails with a `ConvertError` naming the file and the tensor before any data is read.
- `read(name)` maps only that tensor's bytes and returns a read-only view of them with the file's dtype
  (BF16 as `ml_dtypes.bfloat16`); the mapping is released when the caller drops the array, so reading a
  model tensor by tensor never keeps the whole file resident.
- `SafetensorsCheckpoint(folder)` resolves a Hugging Face folder: `model.safetensors.index.json` (every
  shard it names must be a relative path inside the folder, exist and agree with the shard headers), else
  `model.safetensors`, else every `*.safetensors` file in the folder; a tensor name defined twice is an
  error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from .errors import ConvertError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

# safetensors refuses headers above 100 MB; a larger length means a corrupt file or not safetensors at all.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every dtype code the safetensors format defines (used to validate sizes, even for
# dtypes we cannot turn into numpy arrays, so a file with e.g. an F8_E8M0 vision tensor still opens).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# The codes `read` can return as numpy arrays (explicitly little-endian, as the format stores them).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `path`, absolute byte `offset` in that file, and its `nbytes`."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int


class SafetensorsFile:
    """One validated `.safetensors` file. `tensors` maps name -> TensorInfo; `metadata` is `__metadata__`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata, self.tensors = _parse_header(self.path)

    def read(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ConvertError(f"{self.path} has no tensor {name!r}")
        return read_tensor(self.tensors[name])


def read_tensor(info: TensorInfo) -> np.ndarray:
    """A read-only array of shape `info.shape` viewing the memory-mapped bytes of the tensor."""
    if info.dtype not in NUMPY_DTYPES:
        raise ConvertError(
            f"tensor {info.name!r} in {info.path} has dtype {info.dtype}, which cannot be read; "
            f"readable dtypes: {sorted(NUMPY_DTYPES)}")
    dtype = NUMPY_DTYPES[info.dtype]
    if info.nbytes == 0:
        return np.zeros(info.shape, dtype)
    # mmap offsets must be multiples of the allocation granularity: map from the page holding the tensor.
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(info.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), info.offset + info.nbytes - start, access=mmap.ACCESS_READ,
                               offset=start)
    except (OSError, ValueError) as e:  # e.g. the file shrank after its header was validated
        raise ConvertError(f"cannot map tensor {info.name!r} of {info.path}: {e}") from None
    count = math.prod(info.shape)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=info.offset - start).reshape(info.shape)


def _parse_header(path: str) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(
                    f"{path} is {size} bytes: too short for the 8-byte safetensors header length "
                    f"(truncated or not a safetensors file)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise ConvertError(
                    f"{path}: header length field says {header_len} bytes, above the safetensors limit of "
                    f"{MAX_HEADER_BYTES} (corrupt or not a safetensors file)")
            if header_len > size - 8:
                raise ConvertError(
                    f"{path}: header length field says {header_len} bytes but only {size - 8} follow "
                    f"(truncated file)")
            raw = f.read(header_len)
    except OSError as e:
        raise ConvertError(f"cannot read {path}: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: corrupt safetensors header, not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: corrupt safetensors header, expected a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConvertError(f"{path}: corrupt safetensors header, '__metadata__' is not an object")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_start, data_len) for name, entry in header.items()}

    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise ConvertError(f"{path}: corrupt safetensors header, tensors {prev!r} and {name!r} overlap")
    return metadata, tensors


def _tensor_info(path: str, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    def corrupt(why):
        return ConvertError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise corrupt(f"expected an object, got {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise ConvertError(
            f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; the safetensors format defines "
            f"{sorted(_DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise corrupt(f"shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    nbytes = (math.prod(shape) * _DTYPE_BITS[dtype] + 7) // 8
    begin, end = offsets
    if end - begin != nbytes:
        raise corrupt(f"data_offsets {offsets} span {end - begin} bytes but {dtype}{shape} needs {nbytes}")
    if end > data_len:
        raise ConvertError(
            f"{path}: tensor {name!r} needs bytes [{begin}, {end}) of the data section but the file holds only "
            f"{data_len} (truncated file)")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), path=path, offset=data_start + begin,
                      nbytes=nbytes)


class SafetensorsCheckpoint:
    """Every tensor of a Hugging Face model folder, whatever the sharding. `tensors`: name -> TensorInfo."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise ConvertError(f"{self.folder} is not a directory")
        index_path = os.path.join(self.folder, INDEX_NAME)
        if os.path.isfile(index_path):
            self.files, self.tensors = self._from_index(index_path)
            return
        single = os.path.join(self.folder, SINGLE_FILE_NAME)
        if os.path.isfile(single):
            names = [SINGLE_FILE_NAME]
        else:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".safetensors"))
        if not names:
            raise ConvertError(f"{self.folder} holds no {INDEX_NAME}, no {SINGLE_FILE_NAME} and no *.safetensors file")
        self.files = [SafetensorsFile(os.path.join(self.folder, n)) for n in names]
        self.tensors = {}
        for f in self.files:
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise ConvertError(f"tensor {name!r} is defined twice: in {self.tensors[name].path} and {f.path}")
                self.tensors[name] = info

    def _from_index(self, index_path: str):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except OSError as e:
            raise ConvertError(f"cannot read {index_path}: {e}") from None
        except ValueError as e:  # invalid JSON or invalid UTF-8
            raise ConvertError(f"{index_path} is not a valid safetensors index: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConvertError(f"{index_path} is not a valid safetensors index: expected an object whose "
                               f"'weight_map' maps tensor names to shard file names")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        # Checked before any file is opened: an index must not make us read (even the header of) a file
        # outside the model folder.
        outside = sorted(f for f in by_file if not _is_inside(f))
        if outside:
            f = outside[0]
            raise ConvertError(f"{index_path} places {len(by_file[f])} tensors (e.g. {by_file[f][0]!r}) in {f!r}, "
                               f"outside the model folder; shard names must be relative paths inside it")
        missing = sorted(f for f in by_file if not os.path.isfile(os.path.join(self.folder, f)))
        if missing:
            detail = ", ".join(f"{f} ({len(by_file[f])} tensors, e.g. {by_file[f][0]!r})" for f in missing)
            raise ConvertError(f"missing shard file(s) named in {index_path}: {detail}")
        shard_names = sorted(by_file)
        files = [SafetensorsFile(os.path.join(self.folder, f)) for f in shard_names]
        tensors = {}
        for shard, f in zip(shard_names, files):
            listed = set(by_file[shard])
            absent = sorted(listed - set(f.tensors))
            unlisted = sorted(set(f.tensors) - listed)
            if absent:
                raise ConvertError(f"{index_path} places {_names(absent)} in {f.path}, whose header lacks them")
            if unlisted:
                raise ConvertError(f"{f.path} holds {_names(unlisted)}, which {index_path} places elsewhere or omits")
            tensors.update(f.tensors)
        return files, tensors

    def read(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ConvertError(f"{self.folder} has no tensor {name!r}")
        return read_tensor(self.tensors[name])


def _is_inside(shard: str) -> bool:
    """Whether the shard name from an index is a relative path that stays inside the folder. Checked on the
    name, not the resolved path: a shard may be a symlink, as in the Hugging Face cache, whose snapshot
    files link to ../../blobs."""
    parts = shard.replace("\\", "/").split("/")
    return bool(shard) and not os.path.isabs(shard) and parts[0] != "" and ".." not in parts


def _names(names: list[str], limit: int = 10) -> str:
    """`names` for an error message, at most `limit` of them and the count of the rest."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

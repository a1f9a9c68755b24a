"""SHA-256 digests of weights (what a model computes) and of converted files (what is on disk).

    tensor_digest(name, array) -> bytes      sha256 of the name, dtype, shape and little-endian bytes
    weights_digest(params) -> bytes          one digest of a flat {name: array} dict
    file_digests(folder) -> {relpath: hex}   sha256 of every file under `folder`
    file_sha256(path) -> hex
    verify_files(folder, expected, what)     ConvertError naming `what` and the first file that differs

`weights_digest` is what prefix-cache keys use to tell models apart: unlike per-tensor sums it changes when
values move inside a tensor (a permutation) or between tensors. It does not depend on the order of the
dict (tensors are combined sorted by name) nor on the array type: numpy arrays and fully addressable
jax.Arrays of the same values give the same digest. The dtype is part of it, so the same weights in
bfloat16 and float32 give different digests. A converted folder stores the digest of its weights (in the
stored dtype) computed during conversion, so loading it costs no hashing.

`file_digests`/`verify_files` are the integrity check of converted folders (docs/errors.md): one digest per
file of each unit's Orbax checkpoint, recorded at conversion and compared before the unit is restored.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np

from .errors import ConvertError

# Changing what is hashed must change this tag, so digests of different definitions never compare equal.
_WEIGHTS_TAG = b"pcp_jax.weights_digest.v1\n"

# hashlib releases the GIL on large buffers, so hashing several tensors/files at once uses several cores.
_HASH_THREADS = min(8, os.cpu_count() or 1)


def tensor_digest(name: str, array) -> bytes:
    """sha256 over `name`, the dtype name, the shape and the C-order little-endian bytes of `array`."""
    if not getattr(array, "is_fully_addressable", True):
        raise ValueError(f"tensor {name!r} is a jax.Array spread over processes; the digest needs every "
                         f"byte on this host (compute it where the weights are whole, e.g. from the checkpoint)")
    a = np.ascontiguousarray(np.asarray(array))
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    h = hashlib.sha256(json.dumps([name, a.dtype.name, list(a.shape)]).encode() + b"\n")
    h.update(a.reshape(-1).view(np.uint8).data)
    return h.digest()


def combine_digests(digests: Mapping[str, bytes]) -> bytes:
    """One digest of per-tensor digests, independent of their order."""
    h = hashlib.sha256(_WEIGHTS_TAG)
    for name in sorted(digests):
        h.update(json.dumps(name).encode() + digests[name])
    return h.digest()


def weights_digest(params: Mapping[str, object]) -> bytes:
    """A 32-byte sha256 digest of the flat params `{name: array}` (numpy or fully addressable jax arrays),
    hashed one tensor at a time (at most a few tensors are copied to host at once)."""
    names = list(params)
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = dict(zip(names, pool.map(lambda n: tensor_digest(n, params[n]), names)))
    return combine_digests(digests)


def file_digests(folder: str) -> dict[str, str]:
    """{path relative to `folder` with '/' separators: sha256 hex} of every regular file under `folder`."""
    paths = []
    for root, _, files in os.walk(folder):
        paths.extend(os.path.join(root, f) for f in files)
    rels = [os.path.relpath(p, folder).replace(os.sep, "/") for p in sorted(paths)]
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(rels, pool.map(file_sha256, sorted(paths))))


def verify_files(folder: str, expected: Mapping[str, str], what: str) -> None:
    """Compare every file listed in `expected` (relative path -> sha256 hex) with its digest on disk.
    Files not listed are ignored. Raises ConvertError naming `what` and the first missing or changed file."""
    paths = [os.path.join(folder, *rel.split("/")) for rel in sorted(expected)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConvertError(f"integrity check failed for {what}: {missing[0]} is missing "
                           f"({len(missing)} of its {len(paths)} files); reconvert the model")
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
        found = list(pool.map(file_sha256, paths))
    for rel, path, got in zip(sorted(expected), paths, found):
        if got != expected[rel]:
            raise ConvertError(f"integrity check failed for {what}: {path} has sha256 {got[:16]}..., expected "
                               f"{expected[rel][:16]}... (changed or corrupted since conversion); reconvert the model")


def file_sha256(path: str) -> str:
    """sha256 hex of the file at `path`; a ConvertError naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ConvertError(f"cannot read {path} to check its integrity: {e}") from None

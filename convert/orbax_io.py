"""Our converted checkpoint: one Orbax PyTree checkpoint per storage unit, plus `pcp_config.json`.

Layout of a converted folder:

    pcp_config.json        {"format": "pcp_jax.orbax", "format_version": 1, "dtype": "bfloat16",
                            "config": ModelConfig.to_dict(), "units": ["embed", "layers.0", ...]}
    params/embed/          Orbax PyTree checkpoint of the flat dict {"embed": [V, D]}
    params/layers.{i}/     {"layers.{i}.input_norm": ..., "layers.{i}.attn.q_proj": ..., ...}
    params/final_norm/, params/lm_head/

A unit is one layer or one top-level tensor (see `hf_names.unit_of`). Orbax writes a PyTree in one call,
so writing unit by unit bounds the writer's memory by the largest unit rather than the model.

`save_orbax` builds everything in a temporary sibling folder, writes `pcp_config.json` last and renames the
folder into place, so an interrupted or failed save never leaves a folder that loads (or that
`is_orbax_dir` accepts). `load_orbax` restores unit by unit, to host numpy arrays or straight to the
requested shardings, and checks names and shapes against the stored config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from pcp_jax.config import ModelConfig

from .errors import ConvertError
from .hf_loader import dtype_name, resolve_dtype
from .hf_names import expected_shapes, unit_of

FORMAT = "pcp_jax.orbax"
FORMAT_VERSION = 1
CONFIG_NAME = "pcp_config.json"
PARAMS_DIR = "params"

# Stored uncompressed: zstd saved 22% of disk on random-normal bf16 weights, but writing then needs a
# compressed copy of the unit (measured 0.8x its bytes, against none uncompressed) and took twice as long.
# Arrays above CHUNK_BYTES are split into chunks of at most that size, so a sharded restore reads only the
# chunks it needs and I/O runs in parallel.
CHUNK_BYTES = 64 * 2**20


def is_orbax_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a complete converted folder (its pcp_config.json names our format)."""
    try:
        with open(os.path.join(os.fspath(path), CONFIG_NAME)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out_dir: str | os.PathLike) -> str:
    """The absolute path of `out_dir` if it is absent or an empty directory; else a ConvertError."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise ConvertError(f"output path {out_dir} exists and is not a directory; give a new folder")
        if os.listdir(out_dir):
            raise ConvertError(f"output folder {out_dir} exists and is not empty; remove it or give a new folder")
    return out_dir


def save_orbax(out_dir: str | os.PathLike, cfg: ModelConfig, params_iter: Iterable[tuple[str, object]],
               dtype="bfloat16", *, extra_files: Mapping[str, str] | None = None, progress: bool = False) -> str:
    """Write the flat params streamed by `params_iter` as a converted folder at `out_dir`; returns its path.

    `params_iter` yields (name, array) with the names and shapes of `expected_shapes(cfg)`, each unit's
    tensors consecutively (any order within a unit). Arrays (numpy or jax) are cast to `dtype`.
    `extra_files` maps a file name inside the folder to a source path to copy (tokenizer files).
    `out_dir` must be absent or empty. Raises ConvertError naming unexpected, duplicate, misplaced,
    missing or wrongly shaped tensors; on any failure the temporary folder is removed and `out_dir` is left
    as it was.
    """
    out_dir = check_out_dir(out_dir)
    np_dtype = resolve_dtype(dtype)
    shapes = expected_shapes(cfg)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    except OSError as e:
        raise ConvertError(f"cannot create a working folder next to {out_dir}: {e}") from None
    total_bytes = sum(int(np.prod(s)) for s in shapes.values()) * np_dtype.itemsize
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress)
    try:
        units = _write_units(tmp, shapes, params_iter, np_dtype, bar)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype_name(np_dtype),
                "config": cfg.to_dict(), "units": units}
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        # rename(2) replaces an empty directory atomically; a non-empty one (a racing writer) fails.
        os.rename(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConvertError(f"writing {out_dir} failed: {e}") from e
        raise
    finally:
        bar.close()
    return out_dir


def _write_units(tmp: str, shapes: dict[str, tuple[int, ...]], params_iter, np_dtype: np.dtype, bar) -> list[str]:
    params_root = os.path.join(tmp, PARAMS_DIR)
    os.makedirs(params_root)
    done: list[str] = []
    seen: set[str] = set()
    buffer: dict[str, np.ndarray] = {}
    with _unit_writer() as ckptr:
        def flush():
            unit = unit_of(next(iter(buffer)))
            bar.set_postfix_str(unit)
            save_args = {n: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for n in buffer}
            ckptr.save(os.path.join(params_root, unit), ocp.args.PyTreeSave(dict(buffer), save_args=save_args))
            done.append(unit)
            bar.update(sum(a.nbytes for a in buffer.values()))
            buffer.clear()

        for name, array in params_iter:
            if name not in shapes:
                raise ConvertError(f"unexpected tensor {name!r}: the config has no such parameter")
            if name in seen:
                raise ConvertError(f"tensor {name!r} was given twice")
            unit = unit_of(name)
            if unit in done:
                raise ConvertError(f"tensor {name!r} arrived after unit {unit!r} was written; "
                                   f"give each unit's tensors consecutively")
            array = np.asarray(array)
            if array.shape != shapes[name]:
                raise ConvertError(f"tensor {name!r} has shape {array.shape}, expected {shapes[name]}")
            if buffer and unit_of(next(iter(buffer))) != unit:
                flush()
            seen.add(name)
            buffer[name] = array.astype(np_dtype, copy=False)
        if buffer:
            flush()
    missing = [n for n in shapes if n not in seen]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ConvertError(f"{len(missing)} tensors were never given: {shown}")
    return done


def _unit_writer() -> ocp.Checkpointer:
    """A synchronous PyTree checkpointer for dicts of numpy arrays, uncompressed (see CHUNK_BYTES).

    Orbax deep-copies host arrays before writing by default, against concurrent modification; our save
    is synchronous and the buffers are ours, so the copy would only double the memory of every unit."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except OSError as e:
        raise ConvertError(f"{path} is not a converted pcp_jax folder: cannot read {CONFIG_NAME} ({e})") from None
    except ValueError as e:
        raise ConvertError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConvertError(f"{meta_path} does not describe a {FORMAT} checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConvertError(f"{meta_path} has format_version {meta.get('format_version')!r}; this pcp_jax reads "
                           f"version {FORMAT_VERSION} (reconvert the model with this version)")
    return meta


def read_orbax_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(config, stored dtype name) of a converted folder, without reading any tensor."""
    meta = _read_meta(os.fspath(path))
    return ModelConfig.from_dict(meta["config"]), meta["dtype"]


def load_orbax(path: str | os.PathLike, *, shardings=None, dtype=None) -> tuple[ModelConfig, dict[str, object]]:
    """(cfg, flat params) of a converted folder.

    shardings: None -> host numpy arrays; one `jax.sharding.Sharding` -> every tensor restored straight
    to it; a dict name -> Sharding -> each tensor to its own (the dict must name every tensor exactly).
    dtype: None keeps the stored dtype; "float32" | "bfloat16" casts while restoring.
    """
    path = os.fspath(path)
    meta = _read_meta(path)
    cfg = ModelConfig.from_dict(meta["config"])
    out_dtype = resolve_dtype(dtype if dtype is not None else meta["dtype"])
    shapes = expected_shapes(cfg)
    if isinstance(shardings, Mapping):
        unknown = sorted(set(shardings) - set(shapes))
        absent = [n for n in shapes if n not in shardings]
        if unknown or absent:
            raise ConvertError(f"shardings must name every tensor of {path} exactly: unknown {unknown[:10]}, "
                               f"without a sharding {absent[:10]} ({len(unknown)} unknown, {len(absent)} absent)")
    elif shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
        raise ConvertError(f"shardings must be None, a jax.sharding.Sharding or a dict of them, "
                           f"got {type(shardings).__name__}")

    by_unit: dict[str, list[str]] = {}
    for name in shapes:
        by_unit.setdefault(unit_of(name), []).append(name)
    if sorted(meta["units"]) != sorted(by_unit):
        raise ConvertError(f"{path}: stored units {meta['units'][:5]}... do not match its config "
                           f"(expected {list(by_unit)[:5]}...)")

    flat: dict[str, object] = {}
    with ocp.PyTreeCheckpointer() as ckptr:
        for unit, names in by_unit.items():
            args = {n: _restore_args(shapes[n], out_dtype, _pick(shardings, n)) for n in names}
            unit_path = os.path.join(path, PARAMS_DIR, unit)
            try:
                tree = ckptr.restore(unit_path, restore_args=args)
            except (OSError, ValueError, KeyError) as e:
                raise ConvertError(f"cannot restore {unit_path}: {e}") from e
            if sorted(tree) != sorted(names):
                raise ConvertError(f"{unit_path} holds {sorted(tree)}, expected {sorted(names)}")
            for n in names:
                if tuple(tree[n].shape) != shapes[n]:
                    raise ConvertError(f"{unit_path}: {n} has shape {tuple(tree[n].shape)}, expected {shapes[n]}")
                flat[n] = tree[n]
    return cfg, flat


def _pick(shardings, name):
    return shardings.get(name) if isinstance(shardings, Mapping) else shardings


def _restore_args(shape, dtype, sharding):
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dtype)

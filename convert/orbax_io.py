"""Our converted checkpoint: one Orbax PyTree checkpoint per storage unit, plus `pcp_config.json`.

Layout of a converted folder (format version 3, or 4 for an FP8 checkpoint):

    pcp_config.json        {"format": "pcp_jax.orbax", "format_version": 3, "dtype": "bfloat16",
                            "config": ModelConfig.to_dict(), "units": ["embed", "layers.0", ...],
                            "weights_digest": sha256 hex of the weights (digest.weights_digest),
                            "integrity": {"algorithm": "sha256",
                                          "units": {unit: {file under params/unit: sha256 hex}},
                                          "files": {copied file: sha256 hex}},
                            ["fp8": [names of the weights stored as e4m3], version 4 only]
                            "sha256": sha256 hex of the fields above}
    params/embed/          Orbax PyTree checkpoint of the flat dict {"embed": [V, D]}
    params/layers.{i}/     {"layers.{i}.input_norm": ..., "layers.{i}.attn.q_proj": ..., ...}
    params/final_norm/, params/lm_head/

A unit is one layer or one top-level tensor (see `hf_names.unit_of`). Orbax writes a PyTree in one call, so
writing unit by unit bounds the writer's memory by the largest unit rather than the model. An FP8 checkpoint
keeps its FP8 weights as they are: e4m3 values under the weight's name and float32 block scales under
`<name>.scale` (pcp_jax.weights.contract_shapes), in the weight's unit; `dtype` applies to the other tensors.

`save_orbax` builds everything in a temporary sibling folder (`workdir`), writes `pcp_config.json` last and
renames the folder into place, so an interrupted or failed save never leaves a folder that loads (or that
`is_orbax_dir` accepts). `load_orbax` checks pcp_config.json field by field, then restores unit by unit, to
host numpy arrays or straight to the requested shardings, after comparing the unit's files with the
digests recorded at conversion (unless told not to), and checks names and shapes against the stored
config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from pcp_jax.config import ModelConfig
from pcp_jax.weights import SCALE, contract_shapes

from .digest import combine_digests, file_digests, file_sha256, tensor_digest, verify_files
from .errors import ConvertArgumentError, ConvertError
from .hf_loader import DTYPES, E4M3, check_finite, dtype_name, resolve_dtype
from .hf_names import unit_of
from .workdir import (InterruptGuard, copy_file, current_umask, existing_dir_mode, make_partial_dir,
                      remove_stale_partials, remove_tree)

FORMAT = "pcp_jax.orbax"
logger = logging.getLogger("pcp_jax.convert")

# Version 2 added the integrity digests and the weights digest; version 3 the RoPE variant fields of the config
# (a version-2 folder converted from a YaRN config.json holds plain RoPE: it must be converted again); version 4
# the FP8 weights and their scales (the field "fp8"). Plain folders are still written as version 3.
FORMAT_VERSION = 3
FP8_FORMAT_VERSION = 4
READ_VERSIONS = (FORMAT_VERSION, FP8_FORMAT_VERSION)
CONFIG_NAME = "pcp_config.json"
PARAMS_DIR = "params"
SKIP_VERIFY_ENV = "PCP_JAX_SKIP_VERIFY"

# Stored uncompressed: zstd saved 22% of disk on random-normal bf16 weights, but writing then needs a
# compressed copy of the unit (measured 0.8x its bytes, against none uncompressed) and took twice as long.
# Arrays above CHUNK_BYTES are split into chunks of at most that size, so a sharded restore reads only the
# chunks it needs and I/O runs in parallel.
CHUNK_BYTES = 64 * 2**20

# After a failed unit write, the partial folder must stay removed this long before we trust it is gone
# (see workdir.remove_tree).
_SETTLE_S = 0.2


def is_orbax_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a complete converted folder (its pcp_config.json names our format)."""
    try:
        with open(os.path.join(os.fspath(path), CONFIG_NAME)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out_dir: str | os.PathLike) -> str:
    """The absolute path of `out_dir` if it is absent (in an existing folder) or an empty directory; else a
    ConvertArgumentError."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise ConvertArgumentError(f"output path {out_dir} exists and is not a directory; give a new folder")
        if os.listdir(out_dir):
            raise ConvertArgumentError(f"output folder {out_dir} exists and is not empty; remove it or give a new "
                                       f"folder")
    elif not os.path.isdir(os.path.dirname(out_dir)):
        raise ConvertArgumentError(f"output folder {out_dir} cannot be made: its parent {os.path.dirname(out_dir)} "
                                   f"is not an existing folder; create it first")
    return out_dir


def save_orbax(out_dir: str | os.PathLike, cfg: ModelConfig, params_iter: Iterable[tuple[str, object]],
               dtype="bfloat16", *, extra_files: Mapping[str, str] | None = None, progress: bool = False,
               fp8=()) -> str:
    """Write the flat params streamed by `params_iter` as a converted folder at `out_dir`; returns its
    absolute path.

    `params_iter` yields (name, array) with the names and shapes of `contract_shapes(cfg, fp8)`, each unit's
    tensors consecutively (any order within a unit). Arrays (numpy or jax) are cast to `dtype`, except the
    weights named in `fp8`, which must be float8_e4m3fn and are stored as they are, and their scales
    (`<name>.scale`), stored as float32.
    `extra_files` maps a file name inside the folder to a source path to copy (tokenizer files).
    `out_dir` must be absent or empty. Raises ConvertError naming unexpected, duplicate, misplaced,
    missing or wrongly shaped tensors, a tensor holding NaN or infinite values in `dtype` (so a converted
    folder holds finite weights, which its digests then vouch for), and any failure to write (disk full,
    ...); ConvertInterrupted on SIGINT/SIGTERM. On any failure the partial folder is removed and `out_dir` is
    left as it was.
    Permissions, interruption and the cleanup of folders left by killed runs: `workdir`'s docstring.
    """
    out_dir = check_out_dir(out_dir)
    np_dtype = resolve_dtype(dtype)
    fp8 = sorted(fp8)
    try:
        shapes = contract_shapes(cfg, fp8)
    except ValueError as e:
        raise ConvertError(f"save_orbax: {e}") from None
    stored = {n: E4M3 if n in fp8 else np.dtype(np.float32) if n.endswith(SCALE) else np_dtype for n in shapes}
    umask = current_umask()
    kept = existing_dir_mode(out_dir)
    final_mode = kept if kept is not None else 0o777 & ~umask
    remove_stale_partials(out_dir)
    total_bytes = sum(int(np.prod(s)) * stored[n].itemsize for n, s in shapes.items())
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress)
    tmp = None
    with InterruptGuard() as guard, _late_callbacks_ignored():
        try:
            with guard.held():  # a signal between mkdtemp and `tmp = ...` would leak the folder
                tmp = _make_partial(out_dir)
            units, digests, unit_files = _write_units(tmp, out_dir, shapes, params_iter, stored, bar, guard)
            copied = {}
            for name, src in (extra_files or {}).items():
                copy_file(src, os.path.join(tmp, name), umask)
                copied[name] = file_sha256(os.path.join(tmp, name))
            meta = {"format": FORMAT, "format_version": FP8_FORMAT_VERSION if fp8 else FORMAT_VERSION,
                    "dtype": dtype_name(np_dtype), "config": cfg.to_dict(), "units": units,
                    "weights_digest": combine_digests(digests).hex(),
                    "integrity": {"algorithm": "sha256", "units": unit_files, "files": copied}}
            if fp8:
                meta["fp8"] = fp8
            meta["sha256"] = _meta_sha256(meta)
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump(meta, f, indent=2)
            os.chmod(tmp, final_mode)
            # rename(2) replaces an empty directory atomically; a non-empty one (a racing writer) fails.
            os.rename(tmp, out_dir)
        except BaseException as e:
            if tmp is not None:
                with guard.held(deliver=False):  # a second Ctrl-C must not stop the cleanup half-way
                    if not remove_tree(tmp, settle=_SETTLE_S if isinstance(e, _UnitWriteError) else 0.0):
                        logger.warning("could not remove the partial folder %s; the next conversion into %s "
                                       "removes it, or remove it by hand", tmp, out_dir)
            if isinstance(e, OSError):
                raise ConvertError(f"writing {out_dir} failed: {e}") from e
            raise
        finally:
            bar.close()
    return out_dir


def _make_partial(out_dir: str) -> str:
    try:
        return make_partial_dir(out_dir)
    except OSError as e:
        raise ConvertError(f"cannot create a working folder next to {out_dir}: {e}") from None


def _write_units(tmp: str, out_dir: str, shapes: dict[str, tuple[int, ...]], params_iter, stored: dict[str, np.dtype],
                 bar, guard: InterruptGuard) -> tuple[list[str], dict[str, bytes], dict[str, dict[str, str]]]:
    """Write every unit into `tmp` (errors name `out_dir`, the folder the user asked for), each tensor in its
    `stored` dtype; returns (units in order, {tensor: tensor_digest}, {unit: {file: sha256 hex}})."""
    params_root = os.path.join(tmp, PARAMS_DIR)
    os.makedirs(params_root)
    done: list[str] = []
    seen: set[str] = set()
    digests: dict[str, bytes] = {}
    unit_files: dict[str, dict[str, str]] = {}
    buffer: dict[str, np.ndarray] = {}
    with _orbax_quiet(), _unit_writer() as ckptr:
        def flush():
            unit = unit_of(next(iter(buffer)))
            bar.set_postfix_str(unit)
            unit_dir = os.path.join(params_root, unit)
            save_args = {n: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for n in buffer}
            try:
                # Orbax writes from its own threads: a signal raised in the middle could leave them adding
                # files after the cleanup, so it is held until the unit is written.
                with guard.held():
                    ckptr.save(unit_dir, ocp.args.PyTreeSave(dict(buffer), save_args=save_args))
            except Exception as e:  # noqa: BLE001 - TensorStore reports disk full etc. as bare exceptions
                raise _UnitWriteError(f"writing unit {unit!r} of {out_dir} failed: {one_line(e)}") from e
            unit_files[unit] = file_digests(unit_dir)
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
            if (stored[name] == E4M3) != (array.dtype == E4M3):
                raise ConvertError(f"tensor {name!r} has dtype {array.dtype}; the FP8 weights and only they must be "
                                   f"float8_e4m3fn")
            seen.add(name)
            buffer[name] = array.astype(stored[name], copy=False)
            check_finite(buffer[name], f"tensor {name!r}")
            digests[name] = tensor_digest(name, buffer[name])
        if buffer:
            flush()
    missing = [n for n in shapes if n not in seen]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ConvertError(f"{len(missing)} tensors were never given: {shown}")
    return done, digests, unit_files


class _UnitWriteError(ConvertError):
    """Orbax failed while writing a unit; TensorStore may still be finishing other writes of it."""


class _QuietOrbax(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and "No jax.Array in TypeHandlerRegistry" not in record.getMessage()


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax's writer threads log every failure with its traceback at ERROR (a full disk gave 200+ lines)
    before the save re-raises it; we report that exception in one line, so those logs are dropped. So is
    the warning, on every unit, that jax.Array metadata is not kept: we write numpy arrays only."""
    absl_logger = logging.getLogger("absl")
    quiet = _QuietOrbax()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


@contextlib.contextmanager
def _late_callbacks_ignored():
    """After a failed unit write, TensorStore completes the unit's other writes and calls back into the event
    loop Orbax has closed; each call prints an "Event loop is closed" traceback (dozens per failure) that
    says nothing beyond the error we report."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (TensorStore's run over many lines), with its type."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _unit_writer() -> ocp.Checkpointer:
    """A synchronous PyTree checkpointer for dicts of numpy arrays, uncompressed (see CHUNK_BYTES).

    Orbax deep-copies host arrays before writing by default, against concurrent modification; our save
    is synchronous and the buffers are ours, so the copy would only double the memory of every unit."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


def verify_default() -> bool:
    """Whether loaders check integrity when not told: yes, unless PCP_JAX_SKIP_VERIFY is set (not "0")."""
    return os.environ.get(SKIP_VERIFY_ENV, "").strip() in ("", "0")


def _meta_sha256(meta: dict) -> str:
    """sha256 of pcp_config.json's content other than this digest itself (canonical JSON)."""
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _read_meta(path: str, verify: bool) -> tuple[dict, ModelConfig]:
    """pcp_config.json of `path` checked field by field, then (if `verify`) against its own digest, and the
    ModelConfig it holds. Field errors come first: they say what is wrong, a digest mismatch only that
    something is."""
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
    if meta.get("format_version") not in READ_VERSIONS:
        raise ConvertError(f"{meta_path} has format_version {meta.get('format_version')!r}; this pcp_jax reads "
                           f"versions {list(READ_VERSIONS)} (reconvert the model with this version)")
    _check_meta(meta_path, meta)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except ValueError as e:
        raise ConvertError(f"{meta_path}: invalid model config: {e}") from None
    if verify and meta["sha256"] != _meta_sha256(meta):
        raise ConvertError(f"integrity check failed for {meta_path}: its content does not match its 'sha256' "
                           f"(edited or corrupted since conversion); reconvert the model")
    return meta, cfg


def _check_meta(meta_path: str, meta: dict) -> None:
    """Every field of pcp_config.json has the type `save_orbax` writes; else a ConvertError naming it."""
    def bad(field, expected):
        return ConvertError(f"{meta_path}: field {field!r} is {_short(meta.get(field))}; expected {expected}")

    if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in DTYPES:
        raise bad("dtype", f"one of {list(DTYPES)}")
    if not isinstance(meta.get("units"), list) or not all(isinstance(u, str) for u in meta["units"]):
        raise bad("units", "a list of unit names")
    if not _is_hex_digest(meta.get("weights_digest")):
        raise bad("weights_digest", "a sha256 hex digest")
    if not _is_hex_digest(meta.get("sha256")):
        raise bad("sha256", "a sha256 hex digest")
    _check_integrity_field(meta_path, meta.get("integrity"), meta["units"])
    fp8 = meta.get("fp8")
    if (meta["format_version"] == FP8_FORMAT_VERSION) != isinstance(fp8, list) or (
            fp8 is not None and (not fp8 or not all(isinstance(n, str) for n in fp8))):
        raise bad("fp8", f"a non-empty list of FP8 weight names in version {FP8_FORMAT_VERSION}, absent in version "
                         f"{FORMAT_VERSION}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise bad("config", "an object of ModelConfig fields")
    absent = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in config]
    if absent:  # save_orbax writes every field: a missing one means an edited or foreign file
        raise ConvertError(f"{meta_path}: 'config' lacks fields {absent}")


def _check_integrity_field(meta_path: str, integrity, units: list[str]) -> None:
    def bad(why):
        return ConvertError(f"{meta_path}: field 'integrity' {why}")

    if not isinstance(integrity, dict) or integrity.get("algorithm") != "sha256":
        raise bad("must be an object with algorithm 'sha256'")
    per_unit, files = integrity.get("units"), integrity.get("files")
    if not isinstance(per_unit, dict) or sorted(per_unit) != sorted(units):
        raise bad(f"must list the files of every unit of 'units' ({len(units)} units)")
    for where, listing in [*((f"unit {u!r}", per_unit[u]) for u in units), ("'files'", files)]:
        if not isinstance(listing, dict) or not all(_is_hex_digest(v) for v in listing.values()):
            raise bad(f"{where} must map file names to sha256 hex digests")
        for rel in listing:
            if not _is_inner_path(rel):
                raise bad(f"{where} names {rel!r}; expected a relative path inside the folder")


def _is_hex_digest(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _is_inner_path(rel: str) -> bool:
    """A '/'-separated relative path that stays inside its folder (checked before anything is opened)."""
    parts = rel.split("/")
    return bool(rel) and "\\" not in rel and not os.path.isabs(rel) and all(p not in ("", ".", "..") for p in parts)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def read_orbax_config(path: str | os.PathLike, *, verify: bool | None = None) -> tuple[ModelConfig, str]:
    """(config, stored dtype name) of a converted folder, without reading any tensor."""
    path = os.path.abspath(os.fspath(path))
    meta, cfg = _read_meta(path, verify_default() if verify is None else verify)
    return cfg, meta["dtype"]


def stored_weights_digest(path: str | os.PathLike) -> bytes:
    """The `weights_digest` of a converted folder's weights (in its stored dtype), recorded at conversion:
    equal to `weights_digest(load_orbax(path)[1])`, without reading any tensor."""
    path = os.path.abspath(os.fspath(path))
    return bytes.fromhex(_read_meta(path, verify=False)[0]["weights_digest"])


def load_orbax(path: str | os.PathLike, *, shardings=None, dtype=None, verify: bool | None = None
               ) -> tuple[ModelConfig, dict[str, object]]:
    """(cfg, flat params) of a converted folder (relative or absolute path).

    shardings: None -> host numpy arrays; one `jax.sharding.Sharding` -> every tensor restored straight
    to it; a dict name -> Sharding -> each tensor to its own (the dict must name every tensor exactly).
    dtype: None keeps the stored dtype; "float32" | "bfloat16" casts while restoring.
    verify: check every file against the digests recorded at conversion before restoring it (reads the
    checkpoint once more); None -> yes unless the environment sets PCP_JAX_SKIP_VERIFY=1.
    """
    path = os.path.abspath(os.fspath(path))  # Orbax refuses relative checkpoint paths
    verify = verify_default() if verify is None else verify
    meta, cfg = _read_meta(path, verify)
    out_dtype = resolve_dtype(dtype if dtype is not None else meta["dtype"])
    shapes = stored_shapes(path, meta, cfg)
    _check_shardings(path, shardings, shapes)
    by_unit: dict[str, list[str]] = {}
    for name in shapes:
        by_unit.setdefault(unit_of(name), []).append(name)
    if sorted(meta["units"]) != sorted(by_unit):
        raise ConvertError(f"{path}: stored units {meta['units'][:5]}... do not match its config "
                           f"(expected {list(by_unit)[:5]}...)")
    if verify:
        verify_files(path, meta["integrity"]["files"], f"the files copied into {path}")

    flat: dict[str, object] = {}
    with ocp.PyTreeCheckpointer() as ckptr:
        for unit, names in by_unit.items():
            unit_path = os.path.join(path, PARAMS_DIR, unit)
            if verify:
                verify_files(unit_path, meta["integrity"]["units"][unit], f"unit {unit!r} of {path}")
            args = {n: _restore_args(shapes[n], read_dtype(meta, n, out_dtype), _pick(shardings, n)) for n in names}
            flat.update(_restore_unit(ckptr, unit_path, args, {n: shapes[n] for n in names}))
    return cfg, flat


def stored_shapes(path: str, meta: dict, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a converted folder holds (its FP8 weights' scales included) with its shape, in order."""
    try:
        return contract_shapes(cfg, meta.get("fp8", ()))
    except ValueError as e:
        raise ConvertError(f"{os.path.join(path, CONFIG_NAME)}: field 'fp8': {e}") from None


def read_dtype(meta: dict, name: str, dtype: np.dtype) -> np.dtype:
    """The dtype tensor `name` of a converted folder is read in when its floating-point tensors are read in
    `dtype`: FP8 weights stay float8_e4m3fn, their scales float32."""
    if name in meta.get("fp8", ()):
        return E4M3
    return np.dtype(np.float32) if name.endswith(SCALE) else dtype


def _check_shardings(path: str, shardings, shapes) -> None:
    if isinstance(shardings, Mapping):
        unknown = sorted(set(shardings) - set(shapes))
        absent = [n for n in shapes if n not in shardings]
        if unknown or absent:
            raise ConvertError(f"shardings must name every tensor of {path} exactly: unknown {unknown[:10]}, "
                               f"without a sharding {absent[:10]} ({len(unknown)} unknown, {len(absent)} absent)")
    elif shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
        raise ConvertError(f"shardings must be None, a jax.sharding.Sharding or a dict of them, "
                           f"got {type(shardings).__name__}")


def _restore_unit(ckptr, unit_path: str, args: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    try:
        tree = ckptr.restore(unit_path, restore_args=args)
    except Exception as e:  # noqa: BLE001 - TensorStore reports truncated/corrupt chunks as bare exceptions
        raise ConvertError(f"cannot restore {unit_path}: {one_line(e)}") from e
    if not isinstance(tree, dict) or sorted(tree) != sorted(shapes):
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ConvertError(f"{unit_path} holds {found}, expected {sorted(shapes)}")
    for n, shape in shapes.items():
        if tuple(tree[n].shape) != shape:
            raise ConvertError(f"{unit_path}: {n} has shape {tuple(tree[n].shape)}, expected {shape}")
    return tree


def _pick(shardings, name):
    return shardings.get(name) if isinstance(shardings, Mapping) else shardings


def _restore_args(shape, dtype, sharding):
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dtype)

"""Where compiled programs are kept between processes: the compile-cache folder, on by default.

Where it lives: the `compile_cache_dir` given to `Model` / `load_model` (the CLI's `--compile-cache DIR|off`),
else `$PCP_JAX_COMPILE_CACHE` if set (a folder, or `off` / `0` / `none` to disable), else
`$XDG_CACHE_HOME/pcp_jax/xla` (`~/.cache/pcp_jax/xla` without XDG_CACHE_HOME). The executables of a
model's programs are kept in its `executables/` subfolder (pcp_jax.program_store), so a later process
loads them without tracing, lowering or compiling.

`folder(path)` resolves that choice and checks, before anything is compiled, that the folder can be
created and written: on a read-only or full file system it warns once and returns None (programs then last
only as long as the process), instead of reporting programs as stored that never were. JAX's own
persistent compilation cache is not used: its entries are written in place (a crash or a full disk leaves a
truncated entry that it never rewrites) and it saves only XLA's compile, not tracing and lowering.
"""

from __future__ import annotations

import logging
import os
import tempfile

ENV = "PCP_JAX_COMPILE_CACHE"
_OFF = ("off", "0", "none", "false", "")
_PROBE_BYTES = 1 << 16
log = logging.getLogger(__name__)
_warned: set[str] = set()


def is_off(path) -> bool:
    return isinstance(path, str) and path.strip().lower() in _OFF


def default_dir() -> str | None:
    """The folder used when nothing is passed, or None when the environment turns the cache off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if is_off(value) else os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pcp_jax", "xla")


def folder(path: str | None = None) -> str | None:
    """The compile-cache folder to use: `path` ("off": none), else `default_dir()`. ValueError (one line)
    when `path` names a file or cannot be created; None with one warning when the folder cannot be written
    (read-only or full file system)."""
    if is_off(path):
        return None
    if path is None:
        path = default_dir()
        if path is None:
            return None
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"compile cache {path!r} exists and is not a folder")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache folder {path!r} cannot be created: {e.strerror}") from None
    problem = _write_problem(path)
    if problem is not None:
        if path not in _warned:
            _warned.add(path)
            log.warning("pcp_jax: the compile cache %s cannot be written (%s); compiled programs last only as "
                        "long as this process", path, problem)
        return None
    return path


def _write_problem(path: str) -> str | None:
    """Why `path` cannot take a file of _PROBE_BYTES (None when it can): a read-only or full file system."""
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    return None

"""JAX's persistent compilation cache, on by default: programs compiled by one process are read back by
the next instead of being compiled again.

Where it lives: `$PCP_JAX_COMPILE_CACHE` if set (a folder, or `off` / `0` / `none` to disable), else
`$XDG_CACHE_HOME/pcp_jax/xla` (`~/.cache/pcp_jax/xla` without XDG_CACHE_HOME). The CLI's
`--compile-cache DIR|off` overrides both. A cache folder already configured in JAX by the user
(`jax_compilation_cache_dir`) is left as it is. Hits and misses are counted for `report()`.
"""

from __future__ import annotations

import os

ENV = "PCP_JAX_COMPILE_CACHE"
_OFF = ("off", "0", "none", "false", "")
_COUNTS = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}
_state = {"listening": False, "dir": None}


def default_dir() -> str | None:
    """The folder the cache uses when nothing is passed, or None when the environment turns it off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pcp_jax", "xla")


def enable(path: str | None = None) -> str | None:
    """Turn the persistent cache on in `path` (default: `default_dir()`; "off" disables it). Returns the
    folder in use, or None. Idempotent; every program is kept, however small or quick to compile."""
    import jax

    if isinstance(path, str) and path.strip().lower() in _OFF:
        return None
    current = jax.config.jax_compilation_cache_dir
    if path is None:
        if current:  # configured by the user (or by an earlier call): keep it
            return current
        path = default_dir()
        if path is None:
            return None
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"compile cache {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache folder {path!r} cannot be created: {e.strerror}") from None
    if current != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _state["listening"]:
        jax.monitoring.register_event_listener(_count)
        _state["listening"] = True
    _state["dir"] = path
    return path


def _count(event, **_):
    if event in _COUNTS:
        _COUNTS[event] += 1


def report() -> str:
    return (f"[compile cache: {_COUNTS['/jax/compilation_cache/cache_hits']} programs read, "
            f"{_COUNTS['/jax/compilation_cache/cache_misses']} compiled and stored, in {_state['dir']}]")

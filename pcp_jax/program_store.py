"""Compiled executables on disk, so that a later process neither traces, lowers nor compiles them.

Where: `<compile cache folder>/executables/` (pcp_jax.compile_cache: `$PCP_JAX_COMPILE_CACHE`, else
`$XDG_CACHE_HOME/pcp_jax/xla`); off when the compile cache is off. One file per program, named by the
sha256 of its key. The key is the program's signature (pcp_jax.programs), the model's `ProgramContext`
(config, dtype, mesh shape and devices, kernel and strategy choices), the device kind, the process index
and count, the jax / jaxlib / tokamax versions, XLA_FLAGS and a hash of pcp_jax's own source files: a
program is only ever read back by a process that would have compiled exactly it.

Executables are code: loading one runs whatever it holds. The store is used only in a folder owned by
this user that neither the group nor others can write (created 0700); otherwise it is refused with one
warning and programs are compiled as without it. Each entry is checked before it is trusted: a header, the
sha256 of its payload, and the full key stored inside it. An entry that is truncated, corrupt, from another
key or version, or that fails to load is ignored with one warning per store and rewritten by the next
compile (atomically: a temporary file renamed into place), never loaded wrongly and never a crash. A store
that cannot be written (read-only or full disk) warns once and the run goes on.

XLA:CPU (jax 0.12) writes executables it cannot read back when it splits its code generation
("Function ... not found" at the first run). On CPU the store is therefore used only when
`XLA_FLAGS` contains `--xla_cpu_parallel_codegen_split_count=1` (the test suite sets it). A CPU executable
also calls LAPACK (the GDN reference's triangular solve), whose entry points jaxlib fills in only when it
lowers such an op: `ProgramStore.open` does that first, or a loaded program would call through a null
pointer. GPU executables (Triton and Mosaic GPU kernels, registered when their modules are imported by
pcp_jax.kernels.backend) need neither.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
import pickle
import stat
import tempfile

import jax

_MAGIC = b"pcp_jax executable v1\n"
_CPU_UNSPLIT_FLAG = "--xla_cpu_parallel_codegen_split_count=1"
log = logging.getLogger(__name__)


@functools.cache
def source_hash() -> str:
    """sha256 over the bytes of every .py file of the installed pcp_jax (kernels and convert included)."""
    h = hashlib.sha256()
    for package in ("pcp_jax", "pcp_jax.kernels", "pcp_jax.convert"):  # already imported by the caller
        for root in importlib.import_module(package).__path__:
            for folder, dirs, files in sorted(os.walk(root)):
                dirs.sort()
                for name in sorted(f for f in files if f.endswith(".py")):
                    path = os.path.join(folder, name)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def environment() -> str:
    """What besides the model decides compiled code: versions, device kind, processes, XLA flags."""
    device = jax.devices()[0]
    return repr((_version("jax"), _version("jaxlib"), _version("tokamax"), source_hash(), device.platform,
                 device.device_kind, jax.process_index(), jax.process_count(), os.environ.get("XLA_FLAGS", "")))


def unusable_reason(folder: str) -> str | None:
    """Why executables must not be read from `folder` (None when they may): it and its parent must be
    folders owned by this user that the group and others cannot write."""
    if jax.default_backend() == "cpu" and _CPU_UNSPLIT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        return (f"XLA:CPU cannot read back the executables it writes unless XLA_FLAGS has {_CPU_UNSPLIT_FLAG}")
    for path in (folder, os.path.dirname(folder)):
        try:
            st = os.stat(path)
        except OSError as e:
            return f"{path} cannot be read ({e.strerror})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a folder"
        if st.st_uid != os.getuid():
            return f"{path} is owned by user id {st.st_uid}, not by this user ({os.getuid()})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{path} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}); run chmod go-w on it"
    return None


def _prepare_backend() -> str | None:
    """Register what a loaded executable calls but only lowering would register (LAPACK on CPU); the reason
    the store cannot be used when that fails."""
    if jax.default_backend() != "cpu":
        return None
    try:
        import jaxlib.lapack
        import numpy as np
        jaxlib.lapack.prepare_lapack_call("trsm_ffi", np.float32)  # fills in every LAPACK entry point
    except Exception as e:  # noqa: BLE001 - another jaxlib layout: compile instead of loading
        return f"jaxlib's LAPACK entry points cannot be prepared ({type(e).__name__}: {e})"
    return None


class ProgramStore:
    """Executables in `folder` (see the module docstring). `load(key)` returns a `jax.stages.Compiled` or
    None; `save(key, compiled)` writes one. Thread-safe: entries are written under unique temporary names."""

    def __init__(self, folder: str):
        self.folder = folder
        self.saved = 0  # programs written by this process
        self._warned: set[str] = set()

    @classmethod
    def open(cls, cache_folder: str | None) -> "ProgramStore | None":
        """The store under a compile-cache folder (None: no store), created 0700 if absent; None with one
        warning when the folder may not be used."""
        if cache_folder is None:
            return None
        folder = os.path.join(cache_folder, "executables")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as e:
            log.warning("pcp_jax: compiled programs are not kept on disk: %s cannot be created (%s)", folder,
                        e.strerror)
            return None
        reason = unusable_reason(folder) or _prepare_backend()
        if reason is not None:
            log.warning("pcp_jax: compiled programs are not read from or kept in %s: %s", folder, reason)
            return None
        return cls(folder)

    def _warn_once(self, what: str, message: str, *args) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    @staticmethod
    def key(program: str, context: str) -> str:
        """The key of a program (its signature, as text) of a model (its context, as text) in this process's
        environment (`environment()`: versions, device kind, processes, XLA flags, pcp_jax's source)."""
        return "\n".join((program, context, environment()))

    def path(self, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest() + ".exe")

    def load(self, key: str, devices) -> jax.stages.Compiled | None:
        """The executable stored under `key`, loaded for `devices` (the program's devices, in the mesh's
        order), or None when there is none or it cannot be trusted (warned once per store)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._reject(path, f"cannot be read ({e.strerror})")
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return self._reject(path, "is not owned by this user or can be written by others")
        head = len(_MAGIC) + 32
        if len(data) < head or not data.startswith(_MAGIC):
            return self._reject(path, "is truncated or not an executable of this store")
        payload = data[head:]
        if hashlib.sha256(payload).digest() != data[len(_MAGIC):head]:
            return self._reject(path, "is corrupt (its checksum does not match)")
        from jax.experimental import serialize_executable
        try:
            entry = pickle.loads(payload)
            if entry["key"] != key:
                return self._reject(path, "was written for another program, model or version")
            if entry["devices"] != [d.id for d in devices]:
                return self._reject(path, "was written for other devices")
            compiled = serialize_executable.deserialize_and_load(
                entry["executable"], entry["in_tree"], entry["out_tree"], execution_devices=list(devices))
        except Exception as e:  # noqa: BLE001 - any failure to read an entry means: compile instead
            return self._reject(path, f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})")
        return compiled

    def _reject(self, path: str, why: str) -> None:
        self._warn_once("reject", "pcp_jax: ignored a stored program that %s (%s); it is compiled again and "
                        "rewritten (further such entries in this folder are ignored silently)", why, path)
        return None

    def save(self, key: str, compiled: jax.stages.Compiled, devices) -> bool:
        """Write `compiled` (a program over `devices`, in the mesh's order) under `key`; False (with one
        warning per store) when it cannot be written."""
        from jax.experimental import serialize_executable
        try:
            executable, in_tree, out_tree = serialize_executable.serialize(compiled)
            payload = pickle.dumps({"key": key, "executable": executable, "in_tree": in_tree, "out_tree": out_tree,
                                    "devices": [d.id for d in devices]}, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - a program that cannot be serialized is simply not kept
            self._warn_once("serialize", "pcp_jax: a compiled program cannot be kept on disk (%s: %s)",
                            type(e).__name__, str(e)[:200])
            return False
        data = _MAGIC + hashlib.sha256(payload).digest() + payload
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            self._warn_once("write", "pcp_jax: compiled programs cannot be written to %s (%s); they last only as "
                            "long as this process", self.folder, e.strerror)
            return False
        self.saved += 1
        return True


"""The folder a conversion writes into while it runs, and what happens to it when the run cannot finish.

A conversion into OUT_DIR writes into a hidden sibling `.{name}.partial-{host}-{pid}-{random}` and renames
it to OUT_DIR at the end. Guarantees (docs/errors.md):
- Permissions are those of any new folder: directories `0o777 & ~umask`, files `0o666 & ~umask`. A copied
  file is never readable by more people than its source: read bits its source lacks are dropped. When
  OUT_DIR already existed (empty), the finished folder takes its mode.
- SIGINT and SIGTERM during the write raise `ConvertInterrupted` in the main thread; the caller's cleanup
  removes the partial folder. While Orbax writes a unit the signal is held until the unit is done (at most
  one unit): raising inside Orbax's save could leave its writer threads adding files after the cleanup.
- A folder left by a killed run (SIGKILL, power loss) names its host and pid; the next conversion into the
  same OUT_DIR on that host removes it once that pid is no longer running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time

from .errors import ConvertError, ConvertInterrupted

_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def current_umask() -> int:
    """The process umask, read without changing it where the OS reports it (os.umask can only be read by
    setting it, which races with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def partial_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.partial-"


def make_partial_dir(out_dir: str) -> str:
    """A new empty sibling of `out_dir` named after this host and process. It is mode 0o700 (mkdtemp's)
    while it is written, so nobody reads a partial model; the caller sets the final mode before renaming."""
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{partial_prefix(out_dir)}{_host_tag()}-{os.getpid()}-", dir=parent)
    return tmp


def remove_stale_partials(out_dir: str) -> list[str]:
    """Remove the partial siblings of `out_dir` left by dead processes of this host; returns their paths.
    Folders of other hosts, of live processes, or not named by this module are left alone."""
    parent = os.path.dirname(out_dir)
    prefix = partial_prefix(out_dir)
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        owner = name[len(prefix):].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != _host_tag() or not owner[1].isdigit() or _pid_alive(int(owner[1])):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def remove_tree(path: str, settle: float = 0.0, timeout: float = 30.0) -> bool:
    """Remove the folder `path`; returns whether it is gone. With `settle` > 0 it must stay gone that many
    seconds, else it is removed again: after a failed Orbax save, TensorStore may still be finishing writes
    of the same unit, which re-create files while (or after) the tree is removed."""
    deadline = time.monotonic() + timeout
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            if settle <= 0:
                return True
            time.sleep(settle)
            if not os.path.lexists(path):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def copied_file_mode(src: str, umask: int) -> int:
    """0o666 & ~umask, without the read bits `src` (the file a symlink points to) does not have."""
    src_mode = os.stat(src).st_mode
    return (0o666 & ~umask) & (0o222 | (src_mode & 0o444))


def copy_file(src: str, dst: str, umask: int) -> None:
    """Copy the bytes of `src` (following symlinks) into the new file `dst` of mode `copied_file_mode`;
    the file is created with that mode, so it is never readable more widely, even for an instant."""
    mode = copied_file_mode(src, umask)
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout)


def existing_dir_mode(path: str) -> int | None:
    """Permission bits of the directory `path`, or None when it does not exist."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConvertError(f"cannot read the permissions of {path}: {e}") from None


class InterruptGuard:
    """Within `with InterruptGuard() as guard:`, SIGINT/SIGTERM raise ConvertInterrupted in the main thread,
    or, inside `with guard.held():`, when that block ends. Previous handlers are restored on exit. Off the
    main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self._previous: dict[int, object] = {}
        self._holding = 0
        self._pending: int | None = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in _INTERRUPTS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._holding:
            self._pending = signum
            return
        raise ConvertInterrupted(signum)

    @contextlib.contextmanager
    def held(self, deliver: bool = True):
        """Hold signals during the block. With `deliver`, the first one held is raised when the block
        completes normally (if the block raises, that exception propagates: the caller is already
        unwinding); without, held signals are dropped (for cleanup that runs while unwinding anyway)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if not deliver:
            self._pending = None
        elif not self._holding and self._pending is not None:
            signum, self._pending = self._pending, None
            raise ConvertInterrupted(signum)

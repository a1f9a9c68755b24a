"""The compiled programs of one model, by signature: in memory, read back from the store, or compiled.

`CompiledPrograms.get(sig)` returns the executable of a signature (pcp_jax.programs), taking the first of:
one already in memory; one the background compiler has in hand (waited for); one in the on-disk store
(pcp_jax.program_store: loaded without tracing, lowering or compiling); else it is traced, lowered and
compiled on the calling thread, and kept in memory and in the store. `ready(sig)` says whether `get` would return at
once (in memory or in the store), which is how the request path picks the smallest compiled program that
fits a prompt. `prepare(sigs)` queues signatures for the background compiler: worker threads that trace and
lower one program at a time (tracing holds the GIL) and compile in parallel (XLA's compile does not).
`status()` counts programs compiled here, loaded from the store, still pending, and failed.

A process that exits while programs are pending stops the background compiler after the programs in
flight (at most one per worker thread): it never waits for the whole queue.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
from typing import Iterable

import jax

from pcp_jax.program_store import ProgramStore
from pcp_jax.programs import ProgramContext

log = logging.getLogger(__name__)


def default_workers() -> int:
    return max(1, min((os.cpu_count() or 2) // 2, 16))


class CompiledPrograms:
    def __init__(self, ctx: ProgramContext, store: ProgramStore | None):
        self.ctx, self.store = ctx, store
        self._context_key = ctx.describe()
        self._devices = list(ctx.mesh.devices.flat)
        self._compiled: dict = {}
        self._pending: dict = {}     # signature -> Future of a background compile
        self._lock = threading.Lock()
        self._lowering = threading.Lock()  # one trace + lower at a time (the GIL serialises them anyway)
        self._worker = None
        self.counts = collections.Counter()

    # Looking programs up ---------------------------------------------------------------------------
    def lower(self, sig) -> jax.stages.Lowered:
        """`sig`'s program traced and lowered for its abstract arguments (not compiled, not kept): what a
        compile starts from, and what tests inspect (`.compile().as_text()`, `.memory_analysis()`)."""
        return sig.build(self.ctx).lower(*sig.abstract_args(self.ctx))

    def ready(self, sig) -> bool:
        """Whether `get(sig)` returns without compiling: compiled or loaded already, or in the store (loaded
        now). In a job of several processes only what is in memory counts: every process must choose the same
        programs for a request, and their stores may differ."""
        with self._lock:
            if sig in self._compiled:
                return True
            if sig in self._pending:  # the background compiler loads or compiles it: not twice
                return False
        return jax.process_count() == 1 and self._load(sig) is not None

    def get(self, sig) -> jax.stages.Compiled:
        """The executable of `sig` (see the module docstring for where it comes from)."""
        with self._lock:
            found = self._compiled.get(sig)
            pending = self._pending.get(sig)
        if found is not None:
            return found
        if pending is not None:
            return pending.result()
        return self._load(sig) or self._compile(sig)

    def _key(self, sig) -> str:
        return self.store.key(repr(sig), self._context_key)

    def _load(self, sig):
        if self.store is None:
            return None
        compiled = self.store.load(self._key(sig), self._devices)
        if compiled is not None:
            with self._lock:
                compiled = self._compiled.setdefault(sig, compiled)
                self.counts["loaded"] += 1
        return compiled

    def _compile(self, sig) -> jax.stages.Compiled:
        with self._lowering:
            lowered = self.lower(sig)
        compiled = lowered.compile()
        if self.store is not None:
            self.store.save(self._key(sig), compiled, self._devices)
        with self._lock:
            compiled = self._compiled.setdefault(sig, compiled)
            self.counts["compiled"] += 1
        return compiled

    # Background compiling --------------------------------------------------------------------------
    def prepare(self, sigs: Iterable, workers: int | None = None) -> list[concurrent.futures.Future]:
        """Queue every signature that is not ready for the background compiler (programs in the store are
        loaded by it too); returns one future per queued signature, in order."""
        out = []
        for sig in dict.fromkeys(sigs):
            with self._lock:
                if sig in self._compiled:
                    continue
                fut = self._pending.get(sig)
                if fut is None:
                    fut = self._pending[sig] = concurrent.futures.Future()
                    self._background(workers).submit(sig, fut)
            out.append(fut)
        return out

    def _background(self, workers):
        if self._worker is None:
            self._worker = _Workers(workers or default_workers(), self._run_pending)
        return self._worker

    def _run_pending(self, sig, fut: concurrent.futures.Future) -> None:
        try:
            result = self._load(sig) or self._compile(sig)
        except Exception as e:  # noqa: BLE001 - reported through the future and status()
            self.counts["failed"] += 1
            log.warning("pcp_jax: compiling %r failed: %s: %s", sig, type(e).__name__, str(e)[:300])
            fut.set_exception(e)
        else:
            fut.set_result(result)
        finally:
            with self._lock:
                self._pending.pop(sig, None)

    def ready_signatures(self) -> set:
        """The signatures whose programs are in memory (compiled here or loaded)."""
        with self._lock:
            return set(self._compiled)

    def status(self) -> dict:
        """{"compiled": programs compiled by this process, "loaded": read from the store, "pending": queued or
        being compiled in the background, "failed": background compiles that raised, "stored": compiled
        programs written to the store, "store": its folder or None}."""
        with self._lock:
            pending = len(self._pending)
        return {"compiled": self.counts["compiled"], "loaded": self.counts["loaded"], "pending": pending,
                "failed": self.counts["failed"], "stored": self.store.saved if self.store else 0,
                "store": self.store.folder if self.store else None}


class _Workers:
    """`n` threads running `run(sig, future)` for queued items in order. Between items each thread checks
    that the main thread is alive, so an exiting interpreter waits only for the items in flight."""

    def __init__(self, n: int, run):
        self._queue = collections.deque()
        self._ready = threading.Condition()
        self._run = run
        self._threads = [threading.Thread(target=self._loop, name=f"pcp_jax-compile-{i}", daemon=False)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, sig, fut) -> None:
        with self._ready:
            self._queue.append((sig, fut))
            self._ready.notify()

    def _loop(self) -> None:
        main = threading.main_thread()
        while True:
            with self._ready:
                while not self._queue and main.is_alive():
                    self._ready.wait(timeout=0.5)
                if not main.is_alive():
                    while self._queue:  # nobody will wait for these
                        self._queue.popleft()[1].cancel()
                    return
                sig, fut = self._queue.popleft()
            if fut.set_running_or_notify_cancel():
                self._run(sig, fut)

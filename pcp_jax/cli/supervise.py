"""A process of a job runs as two: the process the user started (the supervisor) runs the job in a child (the
worker) and turns the way the worker ended into the command line's one line and exit code.

Why: when a peer dies or the coordinator goes away, XLA may end a process from one of its own threads (a
fatal log, a stack dump, abort()), which no Python code in that process can intercept. The supervisor reads
no log: the worker writes its own output (Python's `sys.stdout` and `sys.stderr`) to copies of the
supervisor's, while its file descriptors 1 and 2, where native code writes (XLA's C++ logs and abort dump,
gloo's connection notes), are discarded unless --debug. A worker that exits
reported its own line; one that ends by SIGABRT (XLA) gets "the job stopped: ..." and exit 1; one killed by
another signal is named, exit 128+N. SIGINT, SIGTERM and SIGHUP to the supervisor kill the worker and end in
"interrupted by ...", 128+N (the worker ignores SIGINT: Ctrl-C reaches both, the supervisor answers).

A worker never outlives its supervisor: on Linux the kernel kills it when the supervisor dies
(PR_SET_PDEATHSIG, SIGKILL, which also ends a stopped worker); elsewhere a thread of the worker watches its
parent (a stopped worker then stays until it is continued).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from pcp_jax.cli.errors import RunError, report_error, signal_name

WORKER_ENV = "PCP_JAX_WORKER"   # "<supervisor pid>[:<stdout copy fd>:<stderr copy fd>]" in a worker's environment
_worker = False


def is_worker() -> bool:
    return _worker


def exit_with_parent(parent: int | None = None) -> None:
    """Make this process die with its parent: PR_SET_PDEATHSIG(SIGKILL) where Linux offers it, else a thread
    that polls the parent. Leaves at once if `parent` (its expected pid) is already gone."""
    armed = False
    try:
        import ctypes
        armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    expected = os.getppid() if parent is None else parent
    if os.getppid() != expected:
        os._exit(1)
    if not armed:
        def watch():
            while os.getppid() == expected:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, daemon=True, name="pcp-jax-parent-watch").start()


def become_worker() -> None:
    """First thing in every `pcp-jax` process: in a worker, die with the supervisor, write Python's output to
    the supervisor's copies, and leave SIGINT to the supervisor. Nothing in any other process."""
    global _worker
    value = os.environ.pop(WORKER_ENV, None)  # not inherited by anything the worker starts
    if value is None:
        return
    _worker = True
    parent, *copies = value.split(":")
    exit_with_parent(int(parent))
    if copies:
        sys.stdout = open(int(copies[0]), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        sys.stderr = open(int(copies[1]), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def supervise(argv: list[str], *, debug: bool, where: str = "") -> int:
    """Run `pcp-jax *argv` as this process's worker; returns the exit code (see the module docstring)."""
    sys.stdout.flush()
    copies = () if debug else (os.dup(1), os.dup(2))
    env = dict(os.environ, **{WORKER_ENV: ":".join(map(str, (os.getpid(), *copies)))})
    quiet = None if debug else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "pcp_jax.cli", *argv], env=env, pass_fds=copies, stdout=quiet,
                            stderr=quiet)
    for fd in copies:
        os.close(fd)
    interrupted = []

    def stop(signum, frame):
        interrupted.append(signum)
        proc.kill()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, stop) for s in handled}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if interrupted:
        stopped = KeyboardInterrupt()
        stopped.signum = interrupted[0]
        return report_error(stopped, debug=False, where=where)
    if code >= 0:
        return code
    if -code == signal.SIGABRT:
        return report_error(RunError(
            "the job stopped: XLA ended this process (SIGABRT), most likely because another process of the job "
            "failed or stopped answering, or the coordinator (process 0) went away; see that process's own error "
            "(--debug shows XLA's log)"), debug=False, where=where)
    report_error(RunError(f"the worker process of this job was killed by {signal_name(-code)}"), debug=False,
                 where=where)
    return 128 - code

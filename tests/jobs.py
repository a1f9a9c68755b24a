"""Starting the processes of a `pcp-jax generate` job on 127.0.0.1 for tests: the shell loop of
docs/multiprocess.md as a function. Every process runs in its own session (so a test can kill it with all it
started), dies with the test process (PR_SET_PDEATHSIG), and is killed in `finish`; every wait is bounded.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest

_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it, between fork and exec


def _die_with_parent():
    _prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A port P of 127.0.0.1 with P and P+1 free (a job uses both)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65534 and bindable(port + 1):
            return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def start(args, env=None, cwd=None) -> subprocess.Popen:
    """`pcp-jax generate *args` in its own session, dying with this process."""
    with warnings.catch_warnings():  # fork with JAX's threads alive: the child only calls prctl, then exec
        warnings.simplefilter("ignore", RuntimeWarning)
        return subprocess.Popen([sys.executable, "-m", "pcp_jax.cli", "generate", *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=_die_with_parent, env=dict(os.environ if env is None else env), cwd=cwd)


def start_job(args, per_process, port=None, env=None) -> list[subprocess.Popen]:
    """One process per entry of `per_process` (its own extra flags), all with `args`, as a job on
    127.0.0.1:port (a free one by default)."""
    port = free_port() if port is None else port
    job = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", len(per_process)]
    return [start([*args, *job, "--process-id", i, *extra], env=env) for i, extra in enumerate(per_process)]


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the session holds the worker too
            except ProcessLookupError:
                pass
        p.wait(timeout=10)


def finish(procs, timeout: float):
    """[(returncode, stdout, stderr)] of each process, all within `timeout` s; kills every session after."""
    deadline = time.monotonic() + timeout
    try:
        outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    except subprocess.TimeoutExpired:
        pytest.fail(f"job processes still running after {timeout} s")
    finally:
        kill(procs)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

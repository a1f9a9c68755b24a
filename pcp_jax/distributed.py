"""Joining a multi-process job: a small layer over `jax.distributed`'s public API.

How a process finds its job (`find_job`), first match wins:
  1. `coordinator`, `num_processes`, `process_id` (flags), optionally `local_device_ids`;
  2. the environment: PCP_COORDINATOR, PCP_NUM_PROCESSES, PCP_PROCESS_ID, PCP_LOCAL_DEVICE_IDS;
  3. `cluster_detection` ("auto" or a JAX method such as "slurm"), or JAX's own JAX_COORDINATOR_ADDRESS:
     `jax.distributed.initialize` finds the rest itself (SLURM, Open MPI, Kubernetes, Cloud TPU, mpi4py);
  4. otherwise there is no job: one process.

With a coordinator HOST:PORT (1, 2), process 0 holds PORT itself for the job's life (the job's *door*) and
JAX's coordination service runs on PORT+1. Before any JAX work:
  - process 0 binds PORT; if it cannot, it asks what holds it and stops with "port P is in use by another job
    (...)" or "port P on HOST is held by another program"; it also checks that PORT+1 is free;
  - every other process connects to the door (retrying until `init_timeout`), introduces itself with its
    record (what its run must agree on, and the result of its own input checks) and waits for the verdict;
    a door that does not answer as one ("another program holds that port"), a job that has already formed,
    or a process id already taken refuse it at once;
  - process 0 compares each record with its own as it arrives; the first difference or refusal is the
    verdict of every process (sent to those connected, and to those that connect while process 0 lingers,
    at most `LINGER_S`); when all N are in and agree the verdict is "go";
  - only then does each process call `jax.distributed.initialize` with HOST:PORT+1, so a process of another
    job never reaches a running job's coordination service (which would end that job);
  - each connection stays open for the job's life: a process that dies (killed, crashed, or stopped by its
    own error) closes it, and its peers report "the job stopped: process I went away" at once, whatever
    they are doing, instead of after JAX's heartbeat timeout.
With auto-detection (3) there is no door: the records are exchanged by one all-gather right after joining
(`jax.experimental.multihost_utils.process_allgather`), before any other device work, and a dead peer is
found by JAX's heartbeat or a failed collective.

A record is a JSON object {"run": {label: value}, "refusal": None | {"code": int, "error": str}}; runs are
compared label by label, so labels should name flags ("--cp"). Nothing here imports JAX at module level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Callable

from pcp_jax.door import Door, JobError, JobRefused, Link, first_problem

XLA_GRACE_S = 10   # JAX's own join deadline, after ours: our watchdog reports first, by name


@dataclasses.dataclass(frozen=True)
class Job:
    coordinator: str | None = None          # HOST:PORT of process 0's door (None: JAX finds the job)
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cluster_detection: str | None = None    # "auto" or a JAX method, when JAX finds the job
    init_timeout: int = 60
    heartbeat_timeout: int = 100
    shutdown_timeout: int = 60
    cpu_collectives: str = "gloo"


@dataclasses.dataclass
class Joined:
    """This process's place in a job that agreed to run; `finish()` once its part is done (after that, a
    peer that goes away is no longer reported)."""
    process_id: int
    num_processes: int
    link: object = None

    def finish(self) -> None:
        if self.link is not None:
            self.link.finish()


def _env_int(environ, name: str) -> int | None:
    value = environ.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment {name}={value!r} is not an integer") from None


def _id_list(text: str, what: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError(f"{what} is empty: got {text!r}")
    return ids


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of HOST:PORT ([v6]:PORT allowed); ValueError naming it otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65534:
        raise ValueError(f"--coordinator={address!r} must be HOST:PORT with PORT in 1..65534 (the job also "
                         f"uses PORT+1)")
    return host.strip("[]"), int(port)


def find_job(*, coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
             local_device_ids: str | None = None, cluster_detection: str | None = None, init_timeout: int = 60,
             heartbeat_timeout: int = 100, shutdown_timeout: int = 60, cpu_collectives: str = "gloo",
             environ=os.environ) -> Job | None:
    """The job this process belongs to (see the module docstring), or None for a run of its own.
    `cluster_detection="none"` means no job whatever the environment says. Raises ValueError naming the
    flag or variable at fault; reads nothing but its arguments and `environ`."""
    if cluster_detection == "none":
        return None
    coordinator = coordinator or environ.get("PCP_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int(environ, "PCP_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int(environ, "PCP_PROCESS_ID")
    ids = local_device_ids or environ.get("PCP_LOCAL_DEVICE_IDS")
    settings = dict(local_device_ids=_id_list(ids, "--local-device-ids") if ids else None,
                    init_timeout=init_timeout, heartbeat_timeout=heartbeat_timeout,
                    shutdown_timeout=shutdown_timeout, cpu_collectives=cpu_collectives)
    if cluster_detection is not None or (coordinator is None and environ.get("JAX_COORDINATOR_ADDRESS")):
        if coordinator is not None or num_processes is not None or process_id is not None:
            raise ValueError("--cluster-detection (or JAX_COORDINATOR_ADDRESS) lets JAX find the job: give it "
                             "without --coordinator, --num-processes and --process-id")
        return Job(cluster_detection=cluster_detection or "auto", **settings)
    if coordinator is None and process_id is None and num_processes in (None, 1):
        return None  # nothing asks for a job (`--num-processes 1` alone is a run of its own)
    missing = [f for f, v in (("--coordinator", coordinator), ("--num-processes", num_processes),
                              ("--process-id", process_id)) if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: give --coordinator, --num-processes and --process-id "
                         f"together (or PCP_COORDINATOR, PCP_NUM_PROCESSES, PCP_PROCESS_ID)")
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} must be in 0..{num_processes - 1} for "
                         f"--num-processes={num_processes}")
    split_address(coordinator)
    return Job(coordinator=coordinator, num_processes=num_processes, process_id=process_id, **settings)


def join(job: Job, make_record: Callable[[int], dict], *, on_lost: Callable[[str], None]) -> Joined:
    """Join `job` (see the module docstring): agree with every process, then `jax.distributed.initialize`.
    `make_record(process_id)` is this process's record (it must not raise: a failed input check is its
    refusal); `on_lost(message)` is called from another thread, and must not return, when the job cannot
    go on (a peer went away, JAX did not connect in time). Raises JobRefused (the common verdict), JobError
    (no job could be formed), ValueError (JAX refused the settings)."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", job.cpu_collectives)
    if job.coordinator is None:
        return _join_found_job(job, make_record, on_lost)
    host, port = split_address(job.coordinator)
    pid, n = job.process_id, job.num_processes
    record = json.loads(json.dumps(make_record(pid)))  # in the form the others read (tuples become lists)
    link = Door(host, port, n, record, job.init_timeout, on_lost) if pid == 0 else \
        Link(host, port, pid, n, record, job.init_timeout, on_lost)
    try:
        link.agree()
    except JobRefused as e:
        e.viewer = pid
        raise
    with_port = lambda h: f"[{h}]:{port + 1}" if ":" in h else f"{h}:{port + 1}"
    jax_address = with_port(host)
    extra = {"coordinator_bind_address": with_port(link.bind_host or "::")} if pid == 0 else {}
    with Watchdog(job.init_timeout, lambda: on_lost(
            f"process {pid} of {n} agreed with every process at {job.coordinator} but JAX's coordination service at "
            f"{jax_address} did not connect them within --init-timeout={job.init_timeout} s")):
        _initialize(job, f"process {pid} of {n} could not join JAX's coordination service at {jax_address}",
                    coordinator_address=jax_address, num_processes=n, process_id=pid,
                    cluster_detection_method="deactivate", **extra)
    return Joined(pid, n, link)


def _initialize(job: Job, failure: str, **kw) -> None:
    """jax.distributed.initialize with the job's settings; a refusal is a JobError starting with `failure`."""
    import jax
    if jax.distributed.is_initialized():
        raise JobError(f"{failure}: this process already joined a job")
    try:
        jax.distributed.initialize(local_device_ids=job.local_device_ids,
                                   initialization_timeout=job.init_timeout + XLA_GRACE_S,
                                   heartbeat_timeout_seconds=job.heartbeat_timeout,
                                   shutdown_timeout_seconds=job.shutdown_timeout, **kw)
    except RuntimeError as e:  # JAX's backends already started: it must join before any JAX work
        raise JobError(f"{failure}: {_first_line(e)}") from None
    except Exception as e:  # ValueError from JAX's checks (nothing detected), a runtime error from the service
        raise JobError(f"{failure}: {_first_line(e)}") from None


def _join_found_job(job: Job, make_record, on_lost) -> Joined:
    """JAX finds the job (its environment, a cluster); the records are compared by one all-gather."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    how = "JAX_COORDINATOR_ADDRESS" if job.cluster_detection == "auto" and os.environ.get(
        "JAX_COORDINATOR_ADDRESS") else f"--cluster-detection={job.cluster_detection}"
    method = None if job.cluster_detection == "auto" else job.cluster_detection
    with Watchdog(job.init_timeout, lambda: on_lost(f"the job found by {how} did not form within "
                                                    f"--init-timeout={job.init_timeout} s")):
        _initialize(job, f"this process could not join the job that {how} names", cluster_detection_method=method)
    pid, n = jax.process_index(), jax.process_count()
    mine = np.frombuffer(json.dumps(make_record(pid)).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([mine.size], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:mine.size] = mine
    gathered = multihost_utils.process_allgather(padded)
    records = {p: json.loads(gathered[p, :sizes[p]].tobytes()) for p in range(n)}
    problem = first_problem(records)
    if problem:
        problem.viewer = pid
        raise problem
    return Joined(pid, n, None)


class Watchdog:
    """Calls `on_timeout` (which must not return) if the block has not finished within `seconds`: JAX's
    joins end in an abort inside XLA, with no Python exception, when they fail."""

    def __init__(self, seconds: float, on_timeout):
        self._timer = threading.Timer(seconds, on_timeout)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

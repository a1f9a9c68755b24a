"""A job's door: process 0 holds the coordinator's port for the job's life; the other processes agree with
it there before JAX starts, and keep their connection to it until they are done (pcp_jax.distributed says
how a job is joined; docs/multiprocess.md what it guarantees).

    Door(host, port, num_processes, record, init_timeout, on_lost)   process 0
    Link(host, port, process_id, num_processes, record, init_timeout, on_lost)   every other process
    .agree()   returns once every process agreed; raises JobRefused (the common verdict) or JobError
    .finish()  this process's part is done: a peer that goes away from now on is not reported
    first_problem(records) -> JobRefused | None   the verdict of {process id: record}

The wire format: one JSON object per line, each carrying PROTOCOL and a kind: "join" (a peer's id, process
count and record) answered by "ack" or "refuse", then "verdict" ({"go": true} or the problem); "probe"
(another job's process 0 that found the port taken) answered by "banner"; "bye" when a process is done. A
record is {"run": {label: value}, "refusal": None | {"code": int, "error": str}}.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import threading
import time

PROTOCOL = "pcp-jax job 1"
ANSWER_S = 5.0     # a door answers an introduction at once: this long without an answer means it is none
LINGER_S = 10.0    # after a failed verdict, process 0 waits this long at most for late peers to tell them
XLA_GRACE_S = 10   # JAX's own join deadline, after ours: our watchdog reports first, by name
_MAX_MESSAGE = 1 << 20


class JobError(RuntimeError):
    """A job that could not form, or that stopped: one line for users, exit 1."""


class JobRefused(Exception):
    """The verdict when the job will not run, the same on every process: `code` (2 for runs that differ or
    a bad argument, else 1), the problem, the process it was found on (None: a difference), and the process
    that raises it (`viewer`, once known)."""

    def __init__(self, code: int, error: str, process: int | None = None, viewer: int | None = None):
        super().__init__(error)
        self.code, self.error, self.process, self.viewer = code, error, process, viewer

    def text(self) -> str:
        if self.process is None or self.process == self.viewer:
            return self.error
        return f"process {self.process} cannot run: {self.error}"


def difference(first: dict, peer: int, theirs: dict) -> str | None:
    """How process `peer`'s run differs from process 0's, label by label (None when it does not)."""
    diff = [k for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)]
    if not diff:
        return None
    shown = "; ".join(f"{k}: process 0 has {first.get(k)!r}, process {peer} has {theirs.get(k)!r}" for k in diff)
    return (f"processes were started with different arguments ({shown}); every process must run the same "
            f"command apart from --process-id")


def first_problem(records: dict[int, dict]) -> JobRefused | None:
    """The verdict of the records in hand (process 0's among them): the first refusal, else the first run
    that differs from process 0's, in process order; None when they agree. Refusals come first: a process
    whose input check failed may also lack what its run is compared by (its prompts' ids)."""
    for pid in sorted(records):
        refusal = records[pid]["refusal"]
        if refusal:
            return JobRefused(int(refusal["code"]), str(refusal["error"]), pid)
    for pid in sorted(records):
        diff = difference(records[0]["run"], pid, records[pid]["run"]) if pid else None
        if diff:
            return JobRefused(2, diff)
    return None


def _send(sock: socket.socket, kind: str, **fields) -> None:
    sock.sendall((json.dumps({"protocol": PROTOCOL, "kind": kind, **fields}) + "\n").encode())


class _Lines:
    """Messages from a socket; EOFError when it closes, ValueError for anything that is not our protocol."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def read(self) -> dict:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
            if len(self.buffer) > _MAX_MESSAGE:
                raise ValueError("message too long")
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict) or message.get("protocol") != PROTOCOL:
            raise ValueError("not a pcp-jax job message")
        return message


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _what_holds(host: str, port: int) -> str:
    """Why process 0 cannot bind `port`: another job's door says so when asked, anything else does not."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            _send(s, "probe")
            banner = _Lines(s).read()
        if banner.get("kind") == "banner":
            state = "running" if banner.get("formed") else "still forming"
            return (f"port {port} is in use by another job ({banner.get('num_processes')} process(es), {state}; "
                    f"its process 0 is pid {banner.get('pid')} on {banner.get('host')}): start this job with "
                    f"another --coordinator port")
    except (OSError, ValueError, EOFError):
        pass
    return f"port {port} on {host} is held by another program: start this job with another --coordinator port"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed job's TIME_WAIT does not count
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class Door:
    """Process 0's side: holds HOST:PORT for the job's life, forms the job from the peers' records (see the
    module docstring), then watches every peer's connection."""

    def __init__(self, host: str, port: int, num_processes: int, record: dict, init_timeout: int, on_lost):
        self.address, self.port, self.n = f"{host}:{port}", port, num_processes
        self.bind_host = ("127.0.0.1" if host == "localhost" else host) if _is_loopback(host) else ""
        self.init_timeout, self.on_lost = init_timeout, on_lost
        family = _family(host)
        try:  # never SO_REUSEPORT: a second job's process 0 must fail to bind here
            self.server = socket.create_server((self.bind_host or ("::" if family == socket.AF_INET6 else ""), port),
                                               family=family, backlog=64)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise JobError(_what_holds(host, port)) from None
            raise JobError(f"process 0 cannot listen on {self.address} (--coordinator): {e.strerror or e}") from None
        if not _port_free(self.bind_host, port + 1):
            record = dict(record, refusal={"code": 1, "error": f"port {port + 1} on {host} (JAX's coordination service "
                                           f"uses --coordinator's port + 1) is held by another program: start "
                                           f"this job with another --coordinator port"})
        self.records, self.conns, self.told, self.done = {0: record}, {}, set(), set()
        self.verdict, self.formed, self.finished = None, False, False
        self.cond = threading.Condition()
        with self.cond:
            self._judge()
        threading.Thread(target=self._accept, daemon=True, name="pcp-jax-door").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="pcp-jax-door-peer").start()

    def _serve(self, conn: socket.socket) -> None:
        lines = _Lines(conn)
        try:
            conn.settimeout(ANSWER_S)
            message = lines.read()
            if message.get("kind") == "probe":
                _send(conn, "banner", num_processes=self.n, formed=self.formed, pid=os.getpid(),
                      host=socket.gethostname())
                conn.close()
                return
            pid = message.get("process_id")
            if message.get("kind") != "join" or not isinstance(pid, int) or pid < 1:
                conn.close()
                return
            with self.cond:
                refusal = self._refusal(pid)
                if refusal:
                    _send(conn, "refuse", error=refusal)
                    conn.close()
                    return
                self.conns[pid], self.records[pid] = conn, message["record"]
                _send(conn, "ack")
                if self.verdict is None:
                    self._judge()
                elif not self.verdict["go"]:
                    self._tell(pid, conn)
            conn.settimeout(None)
        except (OSError, ValueError, EOFError, KeyError, TypeError):
            conn.close()
            return
        self._watch(pid, conn, lines)

    def _refusal(self, pid: int) -> str | None:
        if self.formed:
            return (f"the job at {self.address} has already formed ({self.n} processes are running it): port "
                    f"{self.port} is in use by another job; start this one with another --coordinator port")
        if pid in self.conns:
            return (f"process id {pid} has already joined the job at {self.address}: every process needs its own "
                    f"--process-id (or another job is using port {self.port})")
        return None

    def _judge(self) -> None:
        """With the lock held: decide as soon as a problem shows, or when every process is in."""
        problem = first_problem(self.records)
        if problem:
            self._decide({"go": False, "code": problem.code, "error": problem.error, "process": problem.process})
        elif set(self.records) == set(range(self.n)):
            self._decide({"go": True})

    def _decide(self, verdict: dict) -> None:
        self.verdict = verdict
        self.formed = verdict["go"]
        for pid, conn in list(self.conns.items()):
            self._tell(pid, conn)
        self.cond.notify_all()

    def _tell(self, pid: int, conn: socket.socket) -> None:
        try:
            _send(conn, "verdict", **self.verdict)
            self.told.add(pid)
        except OSError:
            pass

    def _watch(self, pid: int, conn: socket.socket, lines: _Lines) -> None:
        """Until the peer says goodbye or its connection closes; a close without goodbye after the job formed
        means the peer went away."""
        try:
            while lines.read().get("kind") != "bye":
                pass
            with self.cond:
                self.done.add(pid)
            return
        except (OSError, ValueError, EOFError):
            pass
        with self.cond:
            if self.conns.get(pid) is conn:
                del self.conns[pid]
                if self.verdict is None:  # it left before the job formed: it may come back
                    self.records.pop(pid, None)
            lost = self.formed and not self.finished and pid not in self.done
        if lost:
            self.on_lost(f"the job stopped: process {pid} went away (it was killed, or stopped with an error of "
                         f"its own)")

    def agree(self) -> None:
        """Wait for the verdict (at most init_timeout); raise it unless it is "go"."""
        deadline = time.monotonic() + self.init_timeout
        with self.cond:
            while self.verdict is None and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            if self.verdict is None:
                missing = sorted(set(range(self.n)) - set(self.records))
                self._decide({"go": False, "code": 1, "process": 0, "error": (
                    f"process 0 started the coordinator at {self.address} but not all --num-processes={self.n} "
                    f"processes joined within --init-timeout={self.init_timeout} s (missing: "
                    f"{', '.join(map(str, missing))}); start the missing processes, and check that every process "
                    f"was started with --num-processes={self.n} and --coordinator {self.address}")})
            verdict = self.verdict
            if not verdict["go"]:  # tell the peers still to come why, for a while
                linger = min(time.monotonic() + LINGER_S, deadline)
                while set(range(1, self.n)) - self.told and time.monotonic() < linger:
                    self.cond.wait(0.1)
        if not verdict["go"]:
            self.server.close()
            raise JobRefused(verdict["code"], verdict["error"], verdict["process"])

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            for conn in self.conns.values():
                try:
                    _send(conn, "bye")
                except OSError:
                    pass


class Link:
    """A peer's side: introduces itself at process 0's door, waits for the verdict, then watches process 0."""

    bind_host = None

    def __init__(self, host: str, port: int, process_id: int, num_processes: int, record: dict, init_timeout: int,
                 on_lost):
        self.host, self.port, self.address = host, port, f"{host}:{port}"
        self.pid, self.n, self.record = process_id, num_processes, record
        self.init_timeout, self.on_lost = init_timeout, on_lost
        self.finished = self.zero_done = False

    def _connect(self, deadline: float) -> socket.socket:
        while True:
            try:
                return socket.create_connection((self.host, self.port), timeout=2)
            except OSError as e:
                error = e
            if time.monotonic() > deadline:
                raise JobError(f"process {self.pid} of {self.n} could not reach the coordinator at {self.address} "
                               f"within --init-timeout={self.init_timeout} s ({error.strerror or error}); check that "
                               f"process 0 is running and that HOST:PORT is reachable from this host")
            time.sleep(0.25)

    def agree(self) -> None:
        deadline = time.monotonic() + self.init_timeout
        self.sock = sock = self._connect(deadline)
        self.lines = _Lines(sock)
        not_a_door = (f"the coordinator at {self.address} does not answer as a pcp-jax job: port {self.port} is held "
                      f"by another program (or by a job of another pcp-jax version)")
        try:
            sock.settimeout(ANSWER_S)
            _send(sock, "join", process_id=self.pid, num_processes=self.n, record=self.record)
            answer = self.lines.read()
        except (OSError, ValueError, EOFError):
            sock.close()
            raise JobError(not_a_door) from None
        if answer.get("kind") == "refuse":
            sock.close()
            raise JobError(str(answer.get("error")))
        if answer.get("kind") != "ack":
            sock.close()
            raise JobError(not_a_door)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            verdict = self.lines.read()
        except socket.timeout:
            sock.close()
            raise JobError(f"process {self.pid} of {self.n} reached the coordinator at {self.address} but the job did "
                           f"not form within --init-timeout={self.init_timeout} s: check that all processes were "
                           f"started, with the same --num-processes (this one: {self.n})") from None
        except (OSError, ValueError, EOFError):
            sock.close()
            raise JobError(f"process 0 at {self.address} went away before the job formed (see its own "
                           f"error)") from None
        if not verdict.get("go"):
            sock.close()
            raise JobRefused(int(verdict.get("code", 1)), str(verdict.get("error")), verdict.get("process"))
        sock.settimeout(None)
        threading.Thread(target=self._watch, daemon=True, name="pcp-jax-link").start()

    def _watch(self) -> None:
        try:
            while True:
                if self.lines.read().get("kind") == "bye":
                    self.zero_done = True
        except (OSError, ValueError, EOFError):
            pass
        if not (self.finished or self.zero_done):
            self.on_lost("the job stopped: process 0 (the coordinator) went away (it was killed, or stopped with "
                         "an error of its own)")

    def finish(self) -> None:
        self.finished = True
        try:
            _send(self.sock, "bye")
        except OSError:
            pass

"""Multi-process and multi-host runs through `jax.distributed`: one launcher for every topology.

Every process runs `main` with the same arguments except its process id. Each one joins the job
(`jax.distributed.initialize`), checks that all processes were started with the same run (process count,
model, prompt, cp, ...), builds one global mesh whose `cp` axis spans every process's devices (each
process contributes cp / num_processes of its local devices, in process order, so ring neighbours sit on
the same host wherever they can), reads the checkpoint itself, and runs prefill + generation. Only
process 0 prints and writes files. Errors go to stderr, name the offending value, and exit non-zero
within bounded time (`--init-timeout`), whichever process hits them.

How the job is found, first match wins:
  1. flags `--coordinator HOST:PORT --num-processes N --process-id I [--local-device-ids 0,1]`;
  2. environment `PCP_COORDINATOR`, `PCP_NUM_PROCESSES`, `PCP_PROCESS_ID`, `PCP_LOCAL_DEVICE_IDS`;
  3. JAX's cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU) when one is present;
  4. otherwise a plain single-process run.

On CPU, processes talk through JAX's gloo collectives (`jax_cpu_collectives_implementation`, the same
option name in jax 0.11.2 and 0.12) and `--cpu-devices-per-process K` gives each process K virtual
devices. `spawn_local(n, args)` (and `--spawn-local N`) starts n processes on 127.0.0.1 for tests and
single-machine runs. Commands for GPUs and clusters: docs/multiprocess.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

PROG = "pcp_jax.launch"
_KV_PREFIX = "pcp_jax/launch/run"


class LaunchError(Exception):
    """A user-facing failure: the message names the offending value; main prints it and exits 1."""


# Arguments ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Prefill + generation over a cp mesh that spans "
                                "processes and hosts (jax.distributed). See docs/multiprocess.md.")
    g = p.add_argument_group("job (flags, else PCP_* environment, else cluster auto-detection, else one process)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service [PCP_COORDINATOR]")
    g.add_argument("--num-processes", type=int, help="processes in the job [PCP_NUM_PROCESSES]")
    g.add_argument("--process-id", type=int, help="this process's id in 0..N-1 [PCP_PROCESS_ID]")
    g.add_argument("--local-device-ids", help="comma-separated local accelerator ids this process uses "
                   "(one process per GPU: its GPU's index) [PCP_LOCAL_DEVICE_IDS]")
    g.add_argument("--cluster-detection", help="force one JAX cluster detection method (e.g. slurm, mpi4py)")
    g.add_argument("--init-timeout", type=int, default=60,
                   help="seconds to wait for the coordinator and all processes (default 60)")
    g.add_argument("--shutdown-timeout", type=int, default=60,
                   help="seconds the final barrier waits for slower processes (default 60)")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds after which a silent process is declared dead and the job stops (default 100)")
    g.add_argument("--cpu-devices-per-process", type=int,
                   help="virtual CPU devices per process (CPU runs; sets XLA's host device count)")
    g.add_argument("--cpu-collectives", default="gloo", choices=["gloo", "mpi"],
                   help="cross-process collectives on CPU (default gloo)")
    g.add_argument("--spawn-local", type=int, metavar="N",
                   help="start N processes of this run on 127.0.0.1 and wait for them")
    g.add_argument("--spawn-devices-per-process", type=int, metavar="K",
                   help="with --spawn-local on a GPU host: process i gets accelerators i*K..i*K+K-1 "
                   "(--local-device-ids); without it every process sees every accelerator")
    g.add_argument("--spawn-timeout", type=float, default=600,
                   help="with --spawn-local: seconds before stragglers are killed (default 600)")

    m = p.add_argument_group("model (one of --model, --preset, --config)")
    m.add_argument("--model", help="HF folder or converted Orbax folder (every process reads it)")
    m.add_argument("--preset", help="random weights with a named shape from pcp_jax.config.PRESETS")
    m.add_argument("--config", help="random weights with the shape of a JSON file: an HF config.json or "
                   "a ModelConfig.to_dict() dump")
    m.add_argument("--seed", type=int, default=0, help="seed of random weights and of sampling (default 0)")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    m.add_argument("--kernels", default="auto", choices=["auto", "jnp", "gpu"])
    m.add_argument("--gdn-strategy", default="auto", choices=["auto", "batch", "sequence"])
    m.add_argument("--cp", type=int, help="size of the cp axis (default: every device of every process)")

    r = p.add_argument_group("run")
    r.add_argument("--ids", help="token ids: comma-separated, prompts of a batch separated by ';'")
    r.add_argument("--prompt", action="append", help="text (repeat for a batch); needs tokenizer.json in "
                   "the --model folder or --tokenizer")
    r.add_argument("--tokenizer", help="tokenizer.json (default: the one in the --model folder)")
    r.add_argument("--max-new-tokens", type=int, default=16)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-k", type=int)
    r.add_argument("--top-p", type=float)
    r.add_argument("--no-eos", dest="eos", action="store_false", help="ignore the model's EOS token")
    r.add_argument("--warmup", action="store_true", help="run once untimed so timings exclude compilation")
    r.add_argument("--save", help="process 0 writes an .npz: tokens [B, N+new], next_logits [B, V] "
                   "(after the prompt) and logits [B, N, V] (every prompt position), all from this run")
    return p


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise LaunchError(f"environment {name}={v!r} is not an integer") from None


def _parse_id_list(text: str, what: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise LaunchError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise LaunchError(f"{what} is empty: got {text!r}")
    return out


def _resolve_job(args) -> None:
    """Fill coordinator / num_processes / process_id / local_device_ids from the environment."""
    args.coordinator = args.coordinator or os.environ.get("PCP_COORDINATOR") or None
    if args.num_processes is None:
        args.num_processes = _env_int("PCP_NUM_PROCESSES")
    if args.process_id is None:
        args.process_id = _env_int("PCP_PROCESS_ID")
    ids = args.local_device_ids or os.environ.get("PCP_LOCAL_DEVICE_IDS")
    args.local_device_ids = _parse_id_list(ids, "--local-device-ids") if ids else None
    if args.num_processes is not None and args.num_processes < 1:
        raise LaunchError(f"--num-processes={args.num_processes} must be >= 1")
    if args.process_id is not None and args.num_processes is not None \
            and not 0 <= args.process_id < args.num_processes:
        raise LaunchError(f"--process-id={args.process_id} must be in 0..{args.num_processes - 1} "
                          f"for --num-processes={args.num_processes}")
    if args.coordinator is not None and (":" not in args.coordinator
                                         or not args.coordinator.rsplit(":", 1)[1].isdigit()):
        raise LaunchError(f"--coordinator={args.coordinator!r} must be HOST:PORT")
    if args.init_timeout < 1:
        raise LaunchError(f"--init-timeout={args.init_timeout} must be at least 1 second")


def _check_run_args(args) -> None:
    sources = [n for n in ("model", "preset", "config") if getattr(args, n)]
    if len(sources) != 1:
        raise LaunchError("give exactly one of --model PATH, --preset NAME or --config JSON"
                          + (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
    if (args.ids is None) == (args.prompt is None):
        raise LaunchError("give exactly one of --ids 1,2,3 or --prompt TEXT")
    if args.max_new_tokens < 0:
        raise LaunchError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    if args.cp is not None and args.cp < 1:
        raise LaunchError(f"--cp={args.cp} must be >= 1")
    if args.cpu_devices_per_process is not None and args.cpu_devices_per_process < 1:
        raise LaunchError(f"--cpu-devices-per-process={args.cpu_devices_per_process} must be >= 1")


def _run_signature(args) -> dict:
    """What every process must agree on; compared across processes before any device work."""
    keys = ("num_processes", "model", "preset", "config", "seed", "dtype", "kernels", "gdn_strategy", "cp",
            "ids", "prompt", "tokenizer", "max_new_tokens", "temperature", "top_k", "top_p", "eos")
    return {k: getattr(args, k) for k in keys}


# Joining the job ----------------------------------------------------------------------------------
def _cluster_env_present() -> bool:
    """Whether JAX's cluster auto-detection (SLURM, Open MPI, k8s, TPU) would find a job."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # layout changed: let initialize decide
        return True
    return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)


def _set_cpu_devices(k: int) -> None:
    """Before JAX creates its CPU backend: k virtual devices (jax_num_cpu_devices wins over XLA_FLAGS;
    the flag is also rewritten so that child tools see the same count)."""
    import jax
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={k}"])
    try:
        jax.config.update("jax_num_cpu_devices", k)
    except RuntimeError as e:
        raise LaunchError(f"--cpu-devices-per-process={k} came too late: {e}") from None


def join_job(args) -> bool:
    """jax.distributed.initialize from flags / environment / cluster detection; returns whether this is
    a distributed run. Raises LaunchError naming the coordinator when it cannot be reached in time."""
    import jax

    explicit = any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if not explicit and not args.cluster_detection and not _cluster_env_present():
        return False
    if explicit and not args.cluster_detection:
        if args.num_processes == 1 and args.coordinator is None:
            return False  # --num-processes 1 on its own: nothing to join
        missing = [f for f, v in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                  ("--process-id", args.process_id)) if v is None]
        if missing:
            raise LaunchError(f"{', '.join(missing)} missing: give --coordinator, --num-processes and "
                              f"--process-id together (or PCP_COORDINATOR, PCP_NUM_PROCESSES, PCP_PROCESS_ID)")
    if _backend_started():
        raise LaunchError("JAX already created its backends in this process: join the job before any JAX work")
    try:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    except AttributeError:  # pragma: no cover - option renamed in a future jax
        pass
    # A failed connect aborts the process inside XLA (no Python exception, no useful message), so a
    # watchdog that fires just before XLA's own deadline says what went wrong and exits.
    probe = _CoordinatorProbe(args.coordinator if args.process_id != 0 else None)
    with probe, _Watchdog(args.init_timeout, lambda: _join_failure(args, probe)):
        try:
            jax.distributed.initialize(
                coordinator_address=args.coordinator, num_processes=args.num_processes,
                process_id=args.process_id, local_device_ids=args.local_device_ids,
                cluster_detection_method=args.cluster_detection,
                initialization_timeout=args.init_timeout + _XLA_GRACE_S,
                heartbeat_timeout_seconds=args.heartbeat_timeout, shutdown_timeout_seconds=args.shutdown_timeout)
        except Exception as e:  # ValueError from argument checks, XlaRuntimeError from the service
            raise LaunchError(f"process {args.process_id} of {args.num_processes} could not join the job at "
                              f"coordinator {args.coordinator or '(auto-detected)'}: {_first_line(e)}") from None
    # What this process asked for (or what auto-detection found), not jax.process_count(): that would
    # start the backend before check_same_run, and it reports the coordinator's count, not ours.
    state = _distributed_state()
    args.num_processes, args.process_id = state.num_processes, state.process_id
    return True


_XLA_GRACE_S = 10


class _Watchdog:
    """Calls `on_timeout` (which must not return) if the block has not finished within `seconds`."""

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


def _split_host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


class _CoordinatorProbe:
    """Tries, in the background, to open a TCP connection to the coordinator: whether it ever succeeded
    tells an unreachable coordinator from a job that never formed (wrong --num-processes, a missing
    process), even when process 0 has given up and gone by the time we report."""

    def __init__(self, address: str | None):
        self.address, self.reached, self.error = address, False, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                socket.create_connection(_split_host_port(self.address), timeout=2).close()
                self.reached = True
                return
            except (OSError, ValueError) as e:
                self.error = e
            self._stop.wait(0.5)

    def __enter__(self):
        if self.address:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False


def _join_failure(args, probe: _CoordinatorProbe) -> None:
    """The job did not come together within --init-timeout: say why as precisely as we can, then exit."""
    n, pid, t = args.num_processes, args.process_id, args.init_timeout
    where = args.coordinator or "(auto-detected)"
    who = f"process {pid} of {n}" if pid is not None else "this process"
    if pid == 0:
        msg = (f"process 0 started the coordinator at {where} but not all --num-processes={n} processes joined "
               f"within --init-timeout={t} s; start the missing processes, and check that every process was "
               f"started with --num-processes={n} and --coordinator {where}")
    elif probe.address and not probe.reached:
        msg = (f"{who} could not reach the coordinator at {where} within --init-timeout={t} s ({probe.error}); "
               f"check that process 0 is running and that HOST:PORT is reachable from this host")
    else:
        msg = (f"{who} reached the coordinator at {where} but the job did not form within --init-timeout={t} s: "
               f"check that all processes were started, with the same --num-processes (this one: {n})")
    _die(args, msg)


def _die(args, msg: str) -> None:
    """Report and leave at once, from any thread (the main one may be stuck inside XLA)."""
    _fail(args, msg)
    os._exit(1)


def _backend_started() -> bool:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, "_backends", None))


def _distributed_state():
    from jax._src import distributed
    return distributed.global_state


def _kv_client():
    return _distributed_state().client


def check_same_run(args) -> None:
    """Every process publishes its run; process 0 compares all, the others compare with process 0.
    A process started with another --num-processes (or prompt, cp, model...) fails here, by name."""
    client = _kv_client()
    if client is None:
        return
    mine = _run_signature(args)
    pid, n = args.process_id, mine["num_processes"]
    client.key_value_set(f"{_KV_PREFIX}/{pid}", json.dumps(mine, sort_keys=True))
    peers = range(1, n) if pid == 0 else [0]
    for peer in peers:
        try:
            theirs = json.loads(client.blocking_key_value_get(f"{_KV_PREFIX}/{peer}", args.init_timeout * 1000))
        except Exception as e:
            raise LaunchError(f"process {peer} did not publish its run within --init-timeout="
                              f"{args.init_timeout} s ({_first_line(e)}); were all {n} processes started "
                              f"with --num-processes={n}?") from None
        diff = [k for k in sorted(mine) if mine[k] != theirs.get(k)]
        if diff:
            shown = "; ".join(f"--{k.replace('_', '-')}: process {pid} has {mine[k]!r}, process {peer} has "
                              f"{theirs.get(k)!r}" for k in diff)
            raise LaunchError(f"processes were started with different arguments ({shown}); every process "
                              f"must run the same command apart from --process-id")


# The run ------------------------------------------------------------------------------------------
def global_mesh(cp: int | None):
    """A `cp` mesh over cp / num_processes devices of every process, in process order."""
    import jax
    import pcp_jax

    devices = jax.devices()
    nproc = jax.process_count()
    by_proc: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_proc.setdefault(d.process_index, []).append(d)
    cp = len(devices) if cp is None else cp
    where = (f"the job has {len(devices)} {jax.default_backend()} device(s) over {nproc} process(es) "
             f"({', '.join(str(len(by_proc.get(p, []))) for p in range(nproc))} per process)")
    if cp > len(devices):
        raise LaunchError(f"--cp={cp} needs {cp} devices but {where}")
    if cp % nproc:
        raise LaunchError(f"--cp={cp} must be a multiple of the number of processes ({nproc}) so that every "
                          f"process holds an equal share of the sequence; {where}")
    per = cp // nproc
    short = [p for p in range(nproc) if len(by_proc.get(p, [])) < per]
    if short:
        raise LaunchError(f"--cp={cp} needs {per} device(s) on every process but process {short[0]} has "
                          f"{len(by_proc.get(short[0], []))}; {where}")
    try:
        return pcp_jax.make_mesh(cp, [d for p in range(nproc) for d in by_proc[p][:per]])
    except ValueError as e:
        raise LaunchError(str(e)) from None


def _read_prompts(args) -> tuple[list[list[int]], object]:
    if args.ids is not None:
        rows = [_parse_id_list(part, "--ids") for part in args.ids.split(";") if part.strip()]
        if not rows:
            raise LaunchError(f"--ids is empty: got {args.ids!r}")
        return rows, _tokenizer(args, required=False)
    tok = _tokenizer(args, required=True)
    return [tok.encode(text).ids for text in args.prompt], tok


def _tokenizer(args, required: bool):
    path = args.tokenizer
    if path is None and args.model:
        cand = os.path.join(args.model, "tokenizer.json")
        path = cand if os.path.isfile(cand) else None
    if path is None:
        if required:
            raise LaunchError("--prompt needs a tokenizer: put tokenizer.json in the --model folder or pass "
                              "--tokenizer PATH (or give --ids)")
        return None
    if not os.path.isfile(path):
        raise LaunchError(f"--tokenizer={path!r} is not a file")
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


def build_model(args, mesh):
    """The model on `mesh`: read from --model by every process, or random weights of --preset/--config."""
    import jax.numpy as jnp
    import pcp_jax
    from pcp_jax.config import ModelConfig, preset
    from pcp_jax.model import random_params

    kw = dict(mesh=mesh, dtype=args.dtype, kernels=args.kernels, gdn_strategy=args.gdn_strategy)
    if args.model:
        return pcp_jax.load_model(args.model, **kw)
    if args.preset:
        cfg = preset(args.preset)
    else:
        try:
            with open(args.config) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LaunchError(f"--config={args.config!r}: {e}") from None
        cfg = ModelConfig.from_hf(data) if "model_type" in data else ModelConfig.from_dict(data)
    params = random_params(cfg, args.seed, {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype])
    return pcp_jax.Model(cfg, params, **kw)


def run(args, distributed: bool) -> int:
    import jax
    import numpy as np
    from pcp_jax.engine import to_host

    lead = jax.process_index() == 0

    def say(msg: str) -> None:
        if lead:
            print(msg, flush=True)

    mesh = global_mesh(args.cp)
    rows, tok = _read_prompts(args)
    t0 = time.perf_counter()
    model = build_model(args, mesh)
    t_load = time.perf_counter() - t0
    cfg = model.cfg
    eos = cfg.eos_token_id if args.eos else None
    say(f"[{PROG}] {jax.process_count()} process(es), {len(jax.devices())} {jax.default_backend()} device(s), "
        f"cp={model.cp}, distributed={distributed}")
    say(f"[{PROG}] model {args.model or args.preset or args.config} ({cfg.num_layers} layers, "
        f"vocab {cfg.vocab_size}, {args.dtype}), ready in {t_load:.2f} s")

    def generate():
        return model.generate(rows, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, eos_token_id=eos)

    if args.warmup:
        jax.block_until_ready(model.prefill(rows).logits)
        generate()
    t0 = time.perf_counter()
    state = model.prefill(rows)
    next_logits = to_host(state.logits)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate()
    t_gen = time.perf_counter() - t0
    lengths = [len(r) for r in rows]
    note = "" if args.warmup else " (first calls include compilation; --warmup to exclude it)"
    say(f"[{PROG}] prefill {len(rows)}x{max(lengths)} tokens: {t_prefill:.3f} s; "
        f"generate {args.max_new_tokens} new tokens/row (prefill + decode): {t_gen:.3f} s{note}")
    for b, n in enumerate(lengths):
        new = out[b, n:n + args.max_new_tokens].tolist()
        say(f"tokens[{b}]: {','.join(map(str, new))}")
        if tok is not None:
            say(f"text[{b}]: {tok.decode(new)}")
    if args.save:
        logits = model.logits(rows)  # collective: every process takes part, process 0 writes
        if lead:
            np.savez(args.save, tokens=out, next_logits=next_logits, logits=logits,
                     lengths=np.asarray(lengths, np.int32))
            say(f"[{PROG}] wrote {args.save}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.spawn_local is not None:
        rest = _strip_spawn_flags(sys.argv[1:] if argv is None else list(argv))
        return spawn_local(args.spawn_local, rest, timeout=args.spawn_timeout,
                           devices_per_process=args.spawn_devices_per_process)
    try:
        _check_run_args(args)
        _resolve_job(args)
        if args.cpu_devices_per_process:
            _set_cpu_devices(args.cpu_devices_per_process)
        distributed = join_job(args)
        if distributed:
            with _Watchdog(args.init_timeout + 5, lambda: _die(args, "the processes did not compare their runs "
                                                                      f"within --init-timeout={args.init_timeout} s")):
                check_same_run(args)
        return run(args, distributed)
    except LaunchError as e:
        return _fail(args, str(e))
    except ValueError as e:  # the library's own checks (prompt ids, config fields, dtype...)
        return _fail(args, str(e))


def _fail(args, msg: str) -> int:
    pid = getattr(args, "process_id", None)
    who = f" (process {pid})" if pid is not None else ""
    print(f"{PROG}: error{who}: {msg}", file=sys.stderr, flush=True)
    return 1


# Local spawning -----------------------------------------------------------------------------------
def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_spawn_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--spawn-local", "--spawn-timeout", "--spawn-devices-per-process"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def spawn_local(n: int, args: Sequence[str], *, timeout: float = 600, grace: float = 20,
                devices_per_process: int | None = None, env: dict | None = None,
                python: str | None = None) -> int:
    """Start n processes of `python -m pcp_jax.launch *args` on 127.0.0.1 with a fresh port, wait at most
    `timeout` s, kill stragglers, and return the combined status: 0 if all succeed, else the first
    failure's code (128+signal for a signal, 124 on timeout). After one process fails the others get
    `grace` s to fail on their own before they are killed. With `devices_per_process` K, process i is
    given accelerators i*K..i*K+K-1. Children inherit stdout/stderr."""
    if n < 1:
        raise ValueError(f"spawn_local: n={n} must be >= 1")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"spawn_local: devices_per_process={devices_per_process} must be >= 1")
    port = free_loopback_port()
    base = dict(os.environ if env is None else env)
    base["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"  # never listen beyond loopback
    cmd = [python or sys.executable, "-m", "pcp_jax.launch", *args,
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n)]
    procs: list[subprocess.Popen] = []
    restore = _raise_on_sigterm()
    try:
        for i in range(n):
            own = ["--process-id", str(i)]
            if devices_per_process:
                k = devices_per_process
                own += ["--local-device-ids", ",".join(str(d) for d in range(i * k, (i + 1) * k))]
            procs.append(subprocess.Popen(cmd + own, env=base))
        return wait_all(procs, timeout=timeout, grace=grace)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; killing {len(procs)} process(es)", file=sys.stderr, flush=True)
        return 130
    finally:
        kill_all(procs)
        restore()


def _raise_on_sigterm():
    """SIGTERM becomes KeyboardInterrupt so that spawn_local's children die with it; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def wait_all(procs: list[subprocess.Popen], *, timeout: float, grace: float) -> int:
    deadline = time.monotonic() + timeout
    status = 0
    while True:
        codes = [p.poll() for p in procs]
        for c in codes:
            if c not in (None, 0) and status == 0:
                status = 128 - c if c < 0 else c
                deadline = min(deadline, time.monotonic() + grace)
        if all(c is not None for c in codes):
            return status
        if time.monotonic() > deadline:
            late = [i for i, c in enumerate(codes) if c is None]
            why = "after another failed" if status else f"within {timeout:g} s"
            print(f"{PROG}: error: process(es) {late} did not finish {why}; killing them", file=sys.stderr,
                  flush=True)
            kill_all(procs)
            return status or 124
        time.sleep(0.05)


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


if __name__ == "__main__":
    sys.exit(main())

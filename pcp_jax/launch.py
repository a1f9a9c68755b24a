"""Multi-process and multi-host runs through `jax.distributed`: one launcher for every topology.

Every process runs `main` with the same arguments except its process id. Each one joins the job
(`jax.distributed.initialize`), checks that all processes were started with the same run (process count,
model, prompt, cp, tp, ...), builds one global (`cp`, `tp`) mesh that spans every process's devices (each
process contributes cp·tp / num_processes of its local devices, in process order, so ring neighbours and
the `tp` ranks of one `cp` rank sit on the same host wherever they can), reads the blocks of the checkpoint
its own devices hold, and runs prefill + generation. Only process 0 prints and writes files. Errors go to
stderr, one line per process naming the offending value, within bounded time (`--init-timeout`,
`--heartbeat-timeout`), whichever process hits them: exit 2 for bad arguments (checked before any device
work, and agreed on by every process), 1 for a failed run. A process that joins a job runs it in a child it
supervises, so that XLA's abort when a peer dies also ends in one line and exit 1 (see "Supervision").

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

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from pcp_jax.cli import (EXIT_FAILURE, EXIT_USAGE, PREFIX, Parser, RunError, UsageError, error_line, exit_code_for,
                         finite_float, int_at_least, read_tokenizer, report_error, seed_int, wants_debug)

PROG = "pcp_jax.launch"
_KV_PREFIX = "pcp_jax/launch/run"
# Set by spawn_local in its children: a child refuses --spawn-local, whatever its other flags say, so
# that no spelling of the flag can make processes multiply.
SPAWNED_ENV = "PCP_SPAWNED_BY"


class LaunchError(RunError):
    """A job that failed (coordinator unreachable, job never formed): main prints it and exits 1.
    Bad arguments are `UsageError` (exit 2)."""


# Arguments ----------------------------------------------------------------------------------------
def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Prefill + generation over a cp mesh that spans "
               "processes and hosts (jax.distributed). See docs/multiprocess.md.")
    g = p.add_argument_group("job (flags, else PCP_* environment, else cluster auto-detection, else one process)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service [PCP_COORDINATOR]")
    g.add_argument("--num-processes", type=int_at_least(1), help="processes in the job [PCP_NUM_PROCESSES]")
    g.add_argument("--process-id", type=int_at_least(0), help="this process's id in 0..N-1 [PCP_PROCESS_ID]")
    g.add_argument("--local-device-ids", help="comma-separated local accelerator ids this process uses "
                   "(one process per GPU: its GPU's index) [PCP_LOCAL_DEVICE_IDS]")
    g.add_argument("--cluster-detection", help="force one JAX cluster detection method (e.g. slurm, mpi4py)")
    g.add_argument("--init-timeout", type=int_at_least(1), default=60,
                   help="seconds to wait for the coordinator and all processes (default 60)")
    g.add_argument("--shutdown-timeout", type=int_at_least(1), default=60,
                   help="seconds the final barrier waits for slower processes (default 60)")
    g.add_argument("--heartbeat-timeout", type=int_at_least(1), default=100,
                   help="seconds after which a silent process is declared dead and the job stops (default 100)")
    g.add_argument("--cpu-devices-per-process", type=int_at_least(1),
                   help="virtual CPU devices per process (CPU runs; sets XLA's host device count)")
    g.add_argument("--cpu-collectives", default="gloo", choices=["gloo", "mpi"],
                   help="cross-process collectives on CPU (default gloo)")
    g.add_argument("--spawn-local", type=int_at_least(1), metavar="N",
                   help="start N processes of this run on 127.0.0.1 and wait for them")
    g.add_argument("--spawn-devices-per-process", type=int_at_least(1), metavar="K",
                   help="with --spawn-local on a GPU host: process i gets accelerators i*K..i*K+K-1 "
                   "(--local-device-ids); without it every process sees every accelerator")
    g.add_argument("--spawn-timeout", type=finite_float(0.0, low_open=True), default=600,
                   help="with --spawn-local: seconds before stragglers are killed (default 600)")

    m = p.add_argument_group("model (one of --model, --preset, --config)")
    m.add_argument("--model", help="HF folder or converted Orbax folder (every process reads it)")
    m.add_argument("--preset", help="random weights with a named shape from pcp_jax.config.PRESETS")
    m.add_argument("--config", help="random weights with the shape of a JSON file: an HF config.json or "
                   "a ModelConfig.to_dict() dump")
    m.add_argument("--seed", type=seed_int, default=0, help="seed of random weights and of sampling (default 0)")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    m.add_argument("--kernels", default="auto", choices=["auto", "jnp", "gpu"])
    m.add_argument("--gdn-strategy", default="auto", choices=["auto", "batch", "sequence"])
    m.add_argument("--cp", type=int_at_least(1), help="size of the cp axis (default: every device of every process, "
                   "divided by --tp)")
    m.add_argument("--tp", type=int_at_least(1), default=1, help="size of the tp axis: each of its devices holds 1/tp "
                   "of the weights (default 1); the mesh takes --cp x --tp devices")

    r = p.add_argument_group("run")
    r.add_argument("--ids", help="token ids: comma-separated, prompts of a batch separated by ';'")
    r.add_argument("--prompt", action="append", help="text (repeat for a batch); needs tokenizer.json in "
                   "the --model folder or --tokenizer")
    r.add_argument("--tokenizer", help="tokenizer.json (default: the one in the --model folder)")
    r.add_argument("--max-new-tokens", type=int_at_least(0), default=16)
    r.add_argument("--temperature", type=finite_float(0.0), default=0.0)
    r.add_argument("--top-k", type=int_at_least(1), help="sample among the k most likely tokens (k <= vocabulary)")
    r.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True))
    r.add_argument("--no-eos", dest="eos", action="store_false", help="ignore the model's EOS token")
    r.add_argument("--warmup", action="store_true", help="run once untimed so timings exclude compilation")
    r.add_argument("--save", help="process 0 writes an .npz: tokens [B, N+new], next_logits [B, V] "
                   "(after the prompt) and logits [B, N, V] (every prompt position), all from this run; "
                   "its folder must exist (checked before the run)")
    return p


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"environment {name}={v!r} is not an integer") from None


def _parse_id_list(text: str, what: str) -> list[int]:
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise UsageError(f"{what} is empty: got {text!r}")
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
        raise UsageError(f"--num-processes={args.num_processes} must be >= 1")
    if args.process_id is not None and args.num_processes is not None \
            and not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id={args.process_id} must be in 0..{args.num_processes - 1} "
                         f"for --num-processes={args.num_processes}")
    if args.coordinator is not None and (":" not in args.coordinator
                                         or not args.coordinator.rsplit(":", 1)[1].isdigit()):
        raise UsageError(f"--coordinator={args.coordinator!r} must be HOST:PORT")


def _check_run_args(args) -> None:
    sources = [n for n in ("model", "preset", "config") if getattr(args, n)]
    if len(sources) != 1:
        raise UsageError("give exactly one of --model PATH, --preset NAME or --config JSON"
                         + (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
    if (args.ids is None) == (args.prompt is None):
        raise UsageError("give exactly one of --ids 1,2,3 or --prompt TEXT")


def _run_signature(args) -> dict:
    """What every process must agree on, compared across processes before any device work: every flag
    that decides which programs run, in which order, with which collectives (--warmup adds a pass,
    --save adds a full-logits pass), so that a difference fails by name instead of hanging in a collective."""
    keys = ("num_processes", "model", "preset", "config", "seed", "dtype", "kernels", "gdn_strategy", "cp",
            "tp", "ids", "prompt", "tokenizer", "max_new_tokens", "temperature", "top_k", "top_p", "eos", "warmup",
            "save", "cpu_collectives")
    return {k: getattr(args, k) for k in keys}


# Checks each process makes on its own inputs before the job agrees to run --------------------------
def _model_shape(args):
    """The ModelConfig of --preset / --config (None for --model, read later by load_model). A name or a
    file that is not a model shape is a bad argument."""
    from pcp_jax.config import ModelConfig, preset

    if args.preset:
        try:
            return preset(args.preset)
        except ValueError as e:
            raise UsageError(f"--preset: {e}") from None
    if not args.config:
        return None
    try:
        with open(args.config) as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"--config={args.config!r} cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--config={args.config!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config={args.config!r} holds a JSON {type(data).__name__}; expected an object "
                         f"(an HF config.json or a ModelConfig.to_dict() dump)")
    try:
        return ModelConfig.from_hf(data) if "model_type" in data else ModelConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"--config={args.config!r} is not a model shape: {error_line(e)}") from None


def _check_save(path: str | None) -> None:
    """--save is written after the whole run: a folder that is missing or read-only must fail before it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--save={path!r} is a folder; expected a file name (an .npz is written there)")
    if not os.path.isdir(folder):
        raise UsageError(f"--save={path!r}: folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--save={path!r}: folder {folder!r} is not writable")


def _check_tp(args, cfg) -> None:
    """--tp must split the model, judged on its config (for --model read here, without the weights)."""
    if args.tp == 1:
        return
    from pcp_jax.parallel.tensor import check_tp
    if cfg is None:
        from pcp_jax.loading import model_config
        try:
            cfg = model_config(args.model)
        except ValueError:
            return  # not a readable model folder: loading it says why
    try:
        check_tp(cfg, args.tp)
    except ValueError as e:
        raise UsageError(f"--{e}") from None  # "--tp=3 does not split this model: ..."


def prepare(args, writer: bool):
    """What one process checks and reads by itself: the prompts (and their tokenizer), the model shape and
    that --tp splits it, that --model is a folder here, and, on the process that writes (`writer`), the --save
    folder.
    Returns (rows, tokenizer or None, ModelConfig or None)."""
    if args.model and not os.path.isdir(args.model):
        raise UsageError(f"--model={args.model!r} is not a folder on this host")
    cfg = _model_shape(args)
    _check_tp(args, cfg)
    rows, tok = _read_prompts(args)
    if writer:
        _check_save(args.save)
    return rows, tok, cfg


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


def job_requested(args) -> bool:
    """Whether this process is meant to join a multi-process job (flags, PCP_* environment, a cluster)."""
    explicit = any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if args.cluster_detection:
        return True
    if not explicit:
        return _cluster_env_present()
    return not (args.num_processes == 1 and args.coordinator is None)  # --num-processes 1 alone: no job


def join_job(args) -> bool:
    """jax.distributed.initialize from flags / environment / cluster detection; returns whether this is
    a distributed run. Raises LaunchError naming the coordinator when it cannot be reached in time."""
    import jax

    if not job_requested(args):
        return False
    if not args.cluster_detection:
        missing = [f for f, v in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                  ("--process-id", args.process_id)) if v is None]
        if missing:
            raise UsageError(f"{', '.join(missing)} missing: give --coordinator, --num-processes and "
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
    # start the backend before `agree`, and it reports the coordinator's count, not ours.
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
    _die(msg)


def _die(msg: str) -> None:
    """Report and leave at once, from any thread (the main one may be stuck inside XLA)."""
    _exit_path.leave_now(LaunchError(msg))


def _backend_started() -> bool:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, "_backends", None))


def _distributed_state():
    from jax._src import distributed
    return distributed.global_state


def _kv_client():
    return _distributed_state().client


def _read_record(client, args, peer: int) -> dict:
    try:
        return json.loads(client.blocking_key_value_get(f"{_KV_PREFIX}/{peer}", args.init_timeout * 1000))
    except Exception as e:  # timeout, or the coordinator went away
        n = args.num_processes
        raise LaunchError(f"process {peer} did not publish its run within --init-timeout={args.init_timeout} s "
                          f"({_first_line(e)}); were all {n} processes started with --num-processes={n}?") from None


def _difference(first: dict, peer: int, theirs: dict) -> str | None:
    """How process `peer`'s run differs from process 0's, flag by flag (None when it does not)."""
    diff = [k for k in sorted(first) if first[k] != theirs.get(k)]
    if not diff:
        return None
    shown = "; ".join(f"--{k.replace('_', '-')}: process 0 has {first[k]!r}, process {peer} has {theirs.get(k)!r}"
                      for k in diff)
    return (f"processes were started with different arguments ({shown}); every process must run the same "
            f"command apart from --process-id")


def _first_refusal(records: dict, n: int, pid: int) -> Exception | None:
    for peer in range(n):
        refusal = records[peer]["refusal"]
        if refusal:
            msg = refusal["error"] if peer == pid else f"process {peer} cannot run: {refusal['error']}"
            return UsageError(msg) if refusal["code"] == EXIT_USAGE else LaunchError(msg)
    return None


def agree(args, check_inputs):
    """Every process checks its own inputs (`check_inputs()`, whose result is returned), publishes its run
    and any refusal, and reads every other process's record; all reach the same verdict: run, or fail
    with the same first problem (differing arguments first, then refusals, in process order). So no
    process starts device work that a peer will not join, and a problem found on one process (a --save
    folder missing on process 0's host) stops every process at once, by name."""
    client = _kv_client()
    try:
        prepared, refusal = check_inputs(), None
    except Exception as e:  # noqa: BLE001 - published, then raised below on every process alike
        prepared, refusal = None, {"code": exit_code_for(e), "error": error_line(e)}
    pid = args.process_id
    published = json.dumps({"run": _run_signature(args), "refusal": refusal}, sort_keys=True)
    client.key_value_set(f"{_KV_PREFIX}/{pid}", published)
    mine = json.loads(published)  # compared in the form the others read (tuples become lists)
    records = {pid: mine}
    if pid != 0:
        records[0] = _read_record(client, args, 0)
    first, n = records[0]["run"], records[0]["run"]["num_processes"]
    if n != mine["run"]["num_processes"]:  # the others' records may never come: judge by process 0's alone
        raise UsageError(_difference(first, pid, mine["run"]))
    for peer in range(1, n):
        if peer not in records:
            records[peer] = _read_record(client, args, peer)
    for peer in range(1, n):
        difference = _difference(first, peer, records[peer]["run"])
        if difference:
            raise UsageError(difference)
    problem = _first_refusal(records, n, pid)
    if problem:
        raise problem
    return prepared


# The run ------------------------------------------------------------------------------------------
def global_mesh(cp: int | None, tp: int = 1):
    """The job's mesh (pcp_jax.sharding.make_mesh over every process's devices); a mesh the devices cannot
    make is a bad flag."""
    from pcp_jax.sharding import make_mesh
    try:
        return make_mesh(cp, tp)
    except ValueError as e:
        raise UsageError(f"--cp/--tp: {e}") from None


def _read_prompts(args) -> tuple[list[list[int]], object]:
    if args.ids is not None:
        rows = [_parse_id_list(part, "--ids") for part in args.ids.split(";") if part.strip()]
        if not rows:
            raise UsageError(f"--ids is empty: got {args.ids!r}")
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
            raise UsageError("--prompt needs a tokenizer: put tokenizer.json in the --model folder or pass "
                             "--tokenizer PATH (or give --ids)")
        return None
    if not os.path.isfile(path):
        raise UsageError(f"--tokenizer={path!r} is not a file")
    return read_tokenizer(path)


def build_model(args, mesh, cfg=None):
    """The model on `mesh`: read from --model by every process, or random weights of the shape `cfg`
    (from --preset/--config, see `prepare`)."""
    import jax.numpy as jnp
    import pcp_jax
    from pcp_jax.model import random_params

    kw = dict(mesh=mesh, dtype=args.dtype, kernels=args.kernels, gdn_strategy=args.gdn_strategy)
    if args.model:
        try:
            return pcp_jax.load_model(args.model, **kw)
        except ValueError as e:  # a folder that is not a readable model: the run failed, the flag was fine
            raise LaunchError(f"--model={args.model!r} cannot be loaded: {e}") from None
    cfg = cfg or _model_shape(args)
    params = random_params(cfg, args.seed, {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype])
    return pcp_jax.Model(cfg, params, consume_params=True, **kw)


def run(args, distributed: bool, prepared=None) -> int:
    """Prefill + generation (+ --save) on every process; `prepared` is `prepare`'s result."""
    try:
        return _run(args, distributed, prepared or prepare(args, writer=True))
    except ValueError as e:
        # The model and its calls check their arguments (ids in the vocabulary, top_k, a strategy the
        # batch allows) before any work, identically on every process: these are bad flags.
        raise UsageError(str(e)) from None


def _run(args, distributed: bool, prepared) -> int:
    import jax
    import numpy as np
    from pcp_jax.engine import to_host

    lead = jax.process_index() == 0

    def say(msg: str) -> None:
        if lead:
            print(msg, flush=True)

    mesh = global_mesh(args.cp, args.tp)
    rows, tok, cfg = prepared
    t0 = time.perf_counter()
    model = build_model(args, mesh, cfg)
    t_load = time.perf_counter() - t0
    cfg = model.cfg
    eos = cfg.eos_token_id if args.eos else None
    say(f"[{PROG}] {jax.process_count()} process(es), {len(jax.devices())} {jax.default_backend()} device(s), "
        f"cp={model.cp}, tp={model.tp}, distributed={distributed}")
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


class _ExitPath:
    """How this process reports an error and leaves: one line per process, whichever thread fails first
    (the main thread with an exception, or a watchdog); a later failure leaves with the code already
    reported, silently.

    Up to and including `agree`, every process of a job fails alike, so an error returns normally and the
    processes meet at JAX's final barrier. Once the run has started (`running`), a failure other than a
    bad argument may be this process's alone while its peers wait in a collective, or a peer may be dead:
    the final barrier would then wait for --shutdown-timeout and end in XLA's abort, so the process leaves
    at once (os._exit) and its peers learn of it through their collectives or the heartbeat."""

    def __init__(self, debug: bool):
        self.debug, self.process_id, self.running, self.code = debug, None, False, None
        self._lock = threading.Lock()

    def report(self, exc: BaseException) -> int:
        with self._lock:
            if self.code is None:
                where = f" (process {self.process_id})" if self.process_id is not None else ""
                self.code = report_error(exc, debug=self.debug, where=where)
            return self.code

    def leave_now(self, exc: BaseException) -> None:
        code = self.report(exc)
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)

    def should_leave_now(self, code: int) -> bool:
        return self.running and code != EXIT_USAGE


_exit_path = _ExitPath(debug=False)


# Supervision -------------------------------------------------------------------------------------
# A process of a job runs as two: the one the user started (the supervisor) runs the job in a child (the
# worker) and relays its stderr. When a peer dies or the coordinator goes away, XLA ends the worker from
# one of its own threads (a fatal log with a stack dump, then abort(): SIGABRT), which nothing inside
# the worker can intercept: jax.distributed passes XLA no failure callback, and a Python callback given
# to XLA's client directly fails to convert the status it receives (std::bad_cast, abort again). The
# supervisor turns that end into the launcher's one-line error and exit code 1.
WORKER_ENV = "PCP_LAUNCH_WORKER"
_XLA_FATAL = re.compile(rb"^F\d{4} \d\d:\d\d:\d\d")
_JOB_FATAL = b"JAX distributed service detected fatal errors"


def _relay_stderr(stream, debug: bool) -> tuple[bytes | None, bool]:
    """Copy the worker's stderr to ours until it closes. From XLA's first fatal log line on, the rest (its
    continuation and the stack dump) is dropped unless --debug. Returns (that fatal line or None, whether
    the worker printed an error line of its own)."""
    fatal, reported, out = None, False, sys.stderr.buffer
    for line in iter(stream.readline, b""):
        if fatal is None and _XLA_FATAL.match(line):
            fatal = line
        reported = reported or line.startswith(PREFIX.encode())
        if fatal is None or debug:
            out.write(line)
            out.flush()
    return fatal, reported


def _fatal_reason(line: bytes) -> str:
    text = line.decode(errors="replace").strip()
    status = text.split("absl::Status:", 1)[1].strip() if "absl::Status:" in text else text.split("] ", 1)[-1]
    if _JOB_FATAL in line:
        return (f"the job stopped: another process failed or stopped answering, or the coordinator (process 0) "
                f"went away; see that process's own error (XLA: {status[:200]})")
    return f"XLA stopped the process: {status[:300]}"


def supervise(argv: list[str], exit_path: "_ExitPath") -> int:
    """Run this command as a worker process and relay it; returns the worker's exit code, or 1 with one
    line when XLA aborted it (see above), or 128+N when it was killed by signal N."""
    env = dict(os.environ)
    env[WORKER_ENV] = str(os.getpid())
    proc = subprocess.Popen([sys.executable, "-m", "pcp_jax.launch", *argv], env=env, stderr=subprocess.PIPE)
    restore = _raise_on_sigterm()  # SIGTERM or Ctrl-C: the worker is killed below, then "interrupted"
    try:
        fatal, reported = _relay_stderr(proc.stderr, exit_path.debug)
        code = proc.wait()
    finally:
        kill_all([proc])
        restore()
    if code >= 0:
        return code
    if reported:
        return EXIT_FAILURE
    if fatal is not None:
        return exit_path.report(LaunchError(_fatal_reason(fatal)))
    exit_path.report(LaunchError(f"the worker process was killed by {_signal_name(-code)}"))
    return 128 - code


def _quiet_xla_logs() -> None:
    """A worker's failures reach the user as one line each; XLA's own C++ error and warning logs (several
    lines each, e.g. from the coordination service when a peer dies) are left to --debug. Fatal ones
    remain, for the supervisor to recognise."""
    try:
        from jax._src.lib import utils
        utils.absl_set_min_log_level(3)
    except (ImportError, AttributeError):  # another jaxlib layout: XLA's logs stay
        pass


def _exit_with_supervisor(supervisor: int) -> None:
    """A worker must not outlive its supervisor (killed with SIGKILL, it cannot pass the signal on)."""
    def watch():
        while os.getppid() == supervisor:
            time.sleep(0.5)
        os._exit(EXIT_FAILURE)
    threading.Thread(target=watch, daemon=True, name="pcp-launch-supervisor-watch").start()


def _is_collective_failure(exc: BaseException) -> bool:
    """A runtime error of XLA that came out of a cross-process collective (gloo on CPU, NCCL on GPU)."""
    text = str(exc)
    return type(exc).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(
        word in text for word in ("Gloo", "gloo", "NCCL", "collective", "Connection reset", "Connection closed"))


def _spawn_from_command_line(args, argv: list[str]) -> int:
    parent = os.environ.get(SPAWNED_ENV)
    if parent:
        raise UsageError(f"--spawn-local {args.spawn_local} in a process that --spawn-local started (by process "
                         f"{parent}, environment {SPAWNED_ENV}); a started process never starts more: run "
                         f"--spawn-local only from a shell or a script")
    _check_run_args(args)
    _check_save(args.save)  # once here, instead of once per process
    return spawn_local(args.spawn_local, _strip_spawn_flags(argv), timeout=args.spawn_timeout,
                       devices_per_process=args.spawn_devices_per_process)


def _run_process(args, argv: list[str], exit_path: _ExitPath) -> int:
    _check_run_args(args)
    _resolve_job(args)
    exit_path.process_id = args.process_id
    supervisor = os.environ.get(WORKER_ENV)
    if supervisor:
        _exit_with_supervisor(int(supervisor))
        if not exit_path.debug:
            _quiet_xla_logs()
    elif job_requested(args):
        return supervise(argv, exit_path)
    if args.cpu_devices_per_process:
        _set_cpu_devices(args.cpu_devices_per_process)
    distributed = join_job(args)
    exit_path.process_id = args.process_id  # cluster auto-detection may only now have told it
    if not distributed:
        return run(args, False)
    with _Watchdog(args.init_timeout + 5, lambda: _die("the processes did not compare their runs within "
                                                        f"--init-timeout={args.init_timeout} s")):
        prepared = agree(args, lambda: prepare(args, writer=args.process_id == 0))
    exit_path.running = True
    return run(args, True, prepared)


def main(argv: Sequence[str] | None = None) -> int:
    """One process of a job, or (--spawn-local N) the parent of N. Exit codes: 0, 1 (the run failed),
    2 (bad arguments, checked before any device work wherever they can be), 128+N (spawn-local: a
    process died of signal N), 124 (spawn-local: timeout)."""
    global _exit_path
    argv = list(sys.argv[1:] if argv is None else argv)
    _exit_path = exit_path = _ExitPath(debug=wants_debug(argv))
    try:
        args = build_parser().parse_args(argv)
        if args.spawn_local is not None:
            return _spawn_from_command_line(args, argv)
        return _run_process(args, argv, exit_path)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every error becomes one line and an exit code
        if exit_path.running and _is_collective_failure(e):
            e = LaunchError(f"the job stopped: a collective with another process failed, most likely because "
                            f"that process stopped (see its own error): {error_line(e)}")
        code = exit_path.report(e)
        if exit_path.should_leave_now(code):
            exit_path.leave_now(e)
        return code


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
    base[SPAWNED_ENV] = str(os.getpid())
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
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{PREFIX}: interrupted by {_signal_name(signum)}; killing {len(procs)} process(es)", file=sys.stderr,
              flush=True)
        return 128 + signum
    finally:
        kill_all(procs)
        restore()


def _raise_on_sigterm():
    """SIGTERM becomes a KeyboardInterrupt (with `signum`, for the exit code 128+N) so that the processes
    spawn_local or supervise started die with this one; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        interrupt = KeyboardInterrupt()
        interrupt.signum = signum
        raise interrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def wait_all(procs: list[subprocess.Popen], *, timeout: float, grace: float) -> int:
    deadline = time.monotonic() + timeout
    status = 0
    while True:
        codes = [p.poll() for p in procs]
        for i, c in enumerate(codes):
            if c not in (None, 0) and status == 0:
                status = 128 - c if c < 0 else c
                deadline = min(deadline, time.monotonic() + grace)
                if c < 0:  # a process that failed by itself has printed its own line; a killed one cannot
                    print(f"{PREFIX}: process {i} was killed by {_signal_name(-c)}; the others stop with an error "
                          f"of their own or are killed within {grace:g} s", file=sys.stderr, flush=True)
        if all(c is not None for c in codes):
            return status
        if time.monotonic() > deadline:
            late = [i for i, c in enumerate(codes) if c is None]
            why = "after another failed" if status else f"within {timeout:g} s"
            print(f"{PREFIX}: process(es) {late} did not finish {why}; killing them", file=sys.stderr, flush=True)
            kill_all(procs)
            return status or 124
        time.sleep(0.05)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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
    # Through the importable module, not this __main__ copy: the error classes must be the ones that the
    # other modules raise.
    from pcp_jax.launch import main as _main
    sys.exit(_main())

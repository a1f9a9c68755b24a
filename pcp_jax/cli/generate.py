"""`pcp-jax generate`: prefill + generation, in one process or in a job of many (docs/multiprocess.md).

A run reads and checks its prompts (a batch: repeated --prompt, or --ids rows separated by ';'; with --chat
each --prompt is a user message rendered by the checkpoint's chat template), loads the model (--model) or
makes random weights (--preset, --config), then runs ONE prefill, `state = model.prefill(rows,
max_new_tokens=n)`, whose next-token logits (`state.logits`) and KV cache `model.decode(state, n)` continues:
one KV cache at the peak, the tokens `Model.generate` gives. `--save` writes what that run produced.

In a job (pcp_jax.distributed: flags, PCP_* environment, or --cluster-detection) every process runs the same
command apart from --process-id, checks its own inputs, and agrees with the others on its run before any
device work; the process the user started supervises a worker (pcp_jax.cli.supervise). Only process 0 prints
and writes files; each process reports its own error as `pcp-jax: error (process I): ...`.

Choices where the old `generate` and `launch` commands differed:
- `--cpu-devices N` is the virtual CPU devices of this process (`--cpu-devices-per-process`, launch's name,
  is the same flag);
- `--max-new-tokens` defaults to 32 (generate's; launch had 16);
- `--warmup N` compiles every program prompts up to N tokens need (Model.warmup), generate's meaning;
  launch's "one untimed run first" is gone (the compile cache and `pcp-jax warmup` serve it);
- `--cp` defaults to 1 in one process and, in a job of several, to every device of the job divided by --tp
  (each process then holds an equal share);
- `--save` writes tokens [B, N+new] (as Model.generate lays them out), next_logits [B, V] and lengths [B];
  launch's full-sequence logits [B, N, V] took a third prefill and are left to `Model.logits`.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from pcp_jax.cli.args import (add_placement_flags, compile_cache_report, finite_float, id_rows, int_at_least,
                              mesh_for, seed_int, set_cpu_devices, use_compile_cache)
from pcp_jax.cli.errors import EXIT_USAGE, RunError, UsageError, error_line, exit_code_for, report_error
from pcp_jax.cli.inputs import Prepared, check_sources, prepare, signature
from pcp_jax.cli.supervise import is_worker, supervise

DEPRECATED_LAUNCH = ("pcp-jax: note: `pcp-jax launch` is now `pcp-jax generate` (same flags; --spawn-local is gone: "
                     "docs/multiprocess.md); `launch` will be removed in the next release")


def add_parser(sub) -> None:
    for name, help_text in (("generate", "generate from a model, in one process or a job of many"),
                            ("launch", "deprecated name of `generate`")):
        p = sub.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0])
        add_arguments(p)
        p.set_defaults(run=run, deprecated=name == "launch")


def add_arguments(p) -> None:
    m = p.add_argument_group("model (one of --model, --preset, --config) and where it runs")
    m.add_argument("--model", help="HF folder or converted folder (every process of a job reads it)")
    m.add_argument("--preset", help="random weights with a named shape from pcp_jax.config.PRESETS")
    m.add_argument("--config", help="random weights with the shape of a JSON file: an HF config.json or a "
                   "ModelConfig.to_dict() dump")
    m.add_argument("--seed", type=seed_int, default=0, help="seed of random weights and of sampling (default 0)")
    add_placement_flags(m, cp_default=None, cp_help="devices on the context-parallel axis (default: 1 in one "
                        "process; in a job, every device of the job divided by --tp)")
    m.add_argument("--gdn-strategy", default="auto", choices=["auto", "batch", "sequence"])
    r = p.add_argument_group("prompts and generation")
    r.add_argument("--prompt", action="append", help="text (repeat for a batch); needs tokenizer.json in the "
                   "--model folder or --tokenizer")
    r.add_argument("--ids", type=id_rows, help="token ids: comma-separated, prompts of a batch separated by ';'")
    r.add_argument("--tokenizer", help="tokenizer.json (default: the one in the --model folder)")
    r.add_argument("--chat", action="store_true", help="each --prompt is a user message, rendered with the chat "
                   "template of the tokenizer's folder (pcp_jax.chat)")
    r.add_argument("--system", help="with --chat: a system message before each prompt")
    r.add_argument("--max-new-tokens", type=int_at_least(0), default=32)
    r.add_argument("--temperature", type=finite_float(0.0), default=0.0)
    r.add_argument("--top-k", type=int_at_least(1), help="sample among the k most likely tokens (k <= vocabulary)")
    r.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True))
    r.add_argument("--no-eos", dest="eos", action="store_false", help="ignore the model's EOS token")
    r.add_argument("--prefix-cache-mb", type=int_at_least(0), default=0,
                   help="keep prefill KV blocks and GDN states up to this many MiB (reported on stderr)")
    r.add_argument("--warmup", type=int_at_least(1), metavar="N",
                   help="first compile every program prompts up to N tokens need (Model.warmup)")
    r.add_argument("--save", help="process 0 writes an .npz: tokens [B, N+new], next_logits [B, V] (after each "
                   "prompt), lengths [B]; its folder must exist (checked before the run)")
    g = p.add_argument_group("job (flags, else PCP_* environment, else --cluster-detection; else one process)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0 (the job also uses PORT+1) [PCP_COORDINATOR]")
    g.add_argument("--num-processes", type=int_at_least(1), help="processes in the job [PCP_NUM_PROCESSES]")
    g.add_argument("--process-id", type=int_at_least(0), help="this process's id in 0..N-1 [PCP_PROCESS_ID]")
    g.add_argument("--local-device-ids", help="comma-separated local accelerator ids this process uses (one "
                   "process per GPU: its GPU's index) [PCP_LOCAL_DEVICE_IDS]")
    g.add_argument("--cluster-detection", help="let JAX find the job: 'auto' or a method (slurm, ompi, mpi4py, "
                   "...); 'none': one process whatever the environment says")
    g.add_argument("--init-timeout", type=int_at_least(1), default=60,
                   help="seconds to wait for the coordinator and every process (default 60)")
    g.add_argument("--heartbeat-timeout", type=int_at_least(1), default=100,
                   help="seconds after which JAX declares a silent process dead (default 100)")
    g.add_argument("--shutdown-timeout", type=int_at_least(1), default=60,
                   help="seconds the final barrier waits for slower processes (default 60)")
    g.add_argument("--cpu-collectives", default="gloo", choices=["gloo", "mpi"],
                   help="cross-process collectives on CPU (default gloo)")


class ExitPath:
    """How this process reports an error and leaves: one line, whichever thread fails first (the main thread
    with an exception, a watchdog, a lost peer); later failures leave silently with the code reported.
    Once the job runs (`running`) a failure may be this process's alone while its peers wait in a
    collective, so the process leaves at once (os._exit) rather than through JAX's final barrier."""

    def __init__(self, debug: bool, where: str = ""):
        self.debug, self.where, self.running, self.code = debug, where, False, None
        self._lock = threading.Lock()

    def report(self, exc: BaseException) -> int:
        with self._lock:
            if self.code is None:
                self.code = report_error(exc, debug=self.debug, where=self.where)
            return self.code

    def leave_now(self, problem: BaseException | str) -> None:
        code = self.report(RunError(problem) if isinstance(problem, str) else problem)
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def _job(args):
    from pcp_jax.distributed import find_job
    try:
        return find_job(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                        local_device_ids=args.local_device_ids, cluster_detection=args.cluster_detection,
                        init_timeout=args.init_timeout, heartbeat_timeout=args.heartbeat_timeout,
                        shutdown_timeout=args.shutdown_timeout, cpu_collectives=args.cpu_collectives)
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args) -> int:
    if args.deprecated and not is_worker():
        print(DEPRECATED_LAUNCH, file=sys.stderr, flush=True)
    job = _job(args)
    where = f" (process {job.process_id})" if job is not None and job.process_id is not None else ""
    exit_path = ExitPath(args.debug, where)
    try:
        check_sources(args)
    except UsageError as e:
        return exit_path.report(e)
    if job is not None and not is_worker():
        return supervise(["generate", *args.command_argv, *(["--debug"] if args.debug else [])],
                         debug=args.debug, where=where)
    try:
        return _run(args, job, exit_path)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every error becomes one line and an exit code
        if exit_path.running and _is_collective_failure(e):
            e = RunError(f"the job stopped: a collective with another process failed, most likely because that "
                         f"process stopped (see its own error): {error_line(e)}")
        code = exit_path.report(e)
        if exit_path.running and code != EXIT_USAGE:
            exit_path.leave_now(e)
        return code


def _is_collective_failure(exc: BaseException) -> bool:
    """A runtime error of XLA that came out of a cross-process collective (gloo on CPU, NCCL on GPU)."""
    text = str(exc)
    return type(exc).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(
        word in text for word in ("Gloo", "gloo", "NCCL", "collective", "Connection reset", "Connection closed"))


def _run(args, job, exit_path: ExitPath) -> int:
    set_cpu_devices(args.cpu_devices)  # before JAX starts its backends (joining a job starts them)
    cache_dir = use_compile_cache(args.compile_cache)
    if job is None:
        return _generate(args, prepare(args, writer=True, identify=False), None, cache_dir)
    from pcp_jax.distributed import JobError, JobRefused, join

    prepared = Prepared()

    def make_record(process_id: int) -> dict:
        try:
            prepare(args, writer=process_id == 0, identify=True, into=prepared)
            refusal = None
        except Exception as e:  # noqa: BLE001 - published, then raised on every process alike
            refusal = {"code": exit_code_for(e), "error": error_line(e)}
        return {"run": signature(args, prepared, job.num_processes), "refusal": refusal}

    try:
        joined = join(job, make_record, on_lost=exit_path.leave_now)
    except JobRefused as e:
        if e.viewer is not None:
            exit_path.where = f" (process {e.viewer})"
        raise (UsageError if e.code == EXIT_USAGE else RunError)(e.text()) from None
    except (JobError, ValueError) as e:
        raise RunError(str(e)) from None
    exit_path.where = f" (process {joined.process_id})"
    exit_path.running = True
    return _generate(args, prepared, joined, cache_dir)


def build_model(args, mesh, shape, cache_dir):
    """The model on `mesh`: read from --model by every process, or random weights of `shape`."""
    import pcp_jax

    kw = dict(mesh=mesh, dtype=args.dtype, kernels=args.kernels, gdn_strategy=args.gdn_strategy,
              decode_attention=args.decode_attention, compile_cache_dir=cache_dir or "off")
    if args.model:
        try:
            return pcp_jax.load_model(args.model, **kw)
        except ValueError as e:  # a folder that is not a readable model: the run failed, the flag was fine
            raise RunError(f"--model={args.model!r} cannot be loaded: {e}") from None
    import jax.numpy as jnp
    from pcp_jax.weights import random_params
    params = random_params(shape, args.seed, {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype])
    return pcp_jax.Model(shape, params, consume_params=True, **kw)


def _generate(args, prepared: Prepared, joined, cache_dir) -> int:
    import jax
    from pcp_jax.engine import to_host

    lead = joined is None or joined.process_id == 0
    info = (lambda msg: print(msg, file=sys.stderr, flush=True)) if lead else (lambda msg: None)
    rows, tok, n = prepared.rows, prepared.tokenizer, args.max_new_tokens
    mesh = mesh_for(args.cp if args.cp is not None or jax.process_count() > 1 else 1, args.tp)
    t0 = time.perf_counter()
    model = build_model(args, mesh, prepared.shape, cache_dir)
    t_load = time.perf_counter() - t0
    if args.prefix_cache_mb:
        model.enable_prefix_cache(args.prefix_cache_mb << 20)
    eos = model.cfg.eos_token_id if args.eos else None
    try:  # the model checks its arguments before any work: every one of them is a flag
        if args.warmup:
            stats = model.warmup(args.warmup, batch_sizes=(len(rows),), max_new_tokens=n, chunk_size=args.chunk_size,
                                 logits=False, progress=lead, background=True)
            info(f"[warmup: ready for prompts up to {args.warmup} tokens after {stats['ready_seconds']:.1f} s "
                 f"({stats['loaded']} programs loaded, {stats['compiled']} compiled); {stats['pending']} more "
                 f"refining in the background]")
        t0 = time.perf_counter()
        state = model.prefill(rows, max_new_tokens=n, chunk_size=args.chunk_size)
        next_logits = to_host(state.logits)  # on every process: a gather across them
        t1 = time.perf_counter()
        new = model.decode(state, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, eos_token_id=eos)
    except ValueError as e:
        raise UsageError(str(e)) from e
    t2 = time.perf_counter()
    del state
    if joined is not None:
        joined.finish()  # this process's part of the job is done: its peers may leave from now on
    if not lead:
        return 0
    for b, row in enumerate(new):
        out = tok.decode(row.tolist()) if tok is not None else ",".join(map(str, row.tolist()))
        print(out if len(rows) == 1 else f"[{b}] {out}")
    lengths = [len(r) for r in rows]
    what = f"{lengths[0]} prompt tokens" if len(rows) == 1 else \
        f"{len(rows)} prompts of {', '.join(map(str, lengths))} tokens"
    devices = jax.devices()
    info(f"[{what}, {n} new{' each' if len(rows) > 1 else ''}, {t2 - t0:.2f} s (prefill {t1 - t0:.2f} s); model "
         f"ready in {t_load:.2f} s; {jax.process_count()} process(es), {len(devices)} {devices[0].platform} device(s), "
         f"cp={model.cp}, tp={model.tp}]")
    if args.prefix_cache_mb:
        info(f"[prefix cache: {model.prefix_cache_stats()}]")
    info(compile_cache_report(model))
    if args.save:
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        _save(args.save, rows, new, next_logits, min(eos_ids) if eos_ids else 0)  # generate's padding
        info(f"[wrote {args.save}]")
    return 0


def _save(path: str, rows, new, next_logits, fill: int) -> None:
    """The run's results, written whole or not at all (a temporary file renamed into place)."""
    import numpy as np

    lengths = np.asarray([len(r) for r in rows], np.int32)
    tokens = np.full((len(rows), int(lengths.max()) + new.shape[1]), fill, np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
        tokens[b, len(row):len(row) + new.shape[1]] = new[b]
    partial = f"{path}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as f:
            np.savez(f, tokens=tokens, next_logits=next_logits, lengths=lengths)
        os.replace(partial, path)
    except OSError as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise RunError(f"--save={path!r} could not be written: {e.strerror or e}") from None

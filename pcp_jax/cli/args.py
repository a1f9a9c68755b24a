"""Argument types and the flags several commands share (where a model runs, the compile cache, CPU devices).

Every type's message names what was expected; argparse adds the flag (`argument --cp: expected an integer
>= 1, got 0`). Nothing here imports JAX at module level: `pcp-jax --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable

from pcp_jax.cli.errors import RunError, UsageError, error_line


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def seed_int(text: str) -> int:
    """Seeds are the engine's range, 0..2**32-1, checked here so that random weights never see a bad one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {value}")
    return value


def finite_float(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    lo = "(" if low_open else "["
    want = f"a number in {lo}{low:g}, {high:g}]" if high is not None else f"a number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value
    return parse


def int_list(text: str) -> list[int]:
    """`1,2,3` (spaces allowed) as a non-empty list of ints."""
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    values = int_list(text)
    bad = [v for v in values if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {bad[0]} in {text!r}")
    return values


def id_rows(text: str) -> list[list[int]]:
    """`1,2,3;4,5` as rows of token ids (prompts of a batch separated by ';'); no row may be empty."""
    parts = text.split(";")
    if not text.strip() or any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, prompts separated by ';' "
                                         f"(none empty), got {text!r}")
    return [int_list(p) for p in parts]


def chunk_size_arg(text: str):
    """--chunk-size: "auto" (pieces sized from the memory budget), "none" (one piece) or a token count."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return "auto" if word == "auto" else None
    return int_at_least(1)(text)


def require_folder(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{flag}={path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{flag}={path!r} is a file; expected a folder")


def add_placement_flags(p, *, cp_default, cp_help: str) -> None:
    """Flags that say where and how a model runs (generate, warmup)."""
    p.add_argument("--cp", type=int_at_least(1), default=cp_default, help=cp_help)
    p.add_argument("--tp", type=int_at_least(1), default=1,
                   help="devices on the tensor-parallel axis (each holds 1/tp of the weights); --cp x --tp devices")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--kernels", default="auto", choices=["auto", "jnp", "gpu"])
    p.add_argument("--decode-attention", default="auto", choices=["auto", "dense", "split", "split-sum", "pallas"],
                   help="how decode reads the KV cache ('auto': the Pallas kernel on GPUs, else 'dense')")
    p.add_argument("--cpu-devices", type=int_at_least(1),
                   help="virtual CPU devices of this process (CPU runs: --cp x --tp > 1 without accelerators)")
    p.add_argument("--cpu-devices-per-process", dest="cpu_devices", type=int_at_least(1),
                   help=argparse.SUPPRESS)  # the old `launch` name, kept while `launch` is
    p.add_argument("--chunk-size", type=chunk_size_arg, default="auto",
                   help="prefill pieces: 'auto' (default: sized from the memory budget), 'none' (one piece) "
                   "or a token count")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="compile-cache folder: executables compiled once are loaded by later runs "
                   "(default: $PCP_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/pcp_jax/xla; 'off' disables it)")


def set_cpu_devices(n: int | None) -> None:
    """--cpu-devices: n virtual CPU devices in this process (JAX's `jax_num_cpu_devices`, which wins over
    XLA_FLAGS); must come before JAX starts its backends."""
    if n is None:
        return
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already started (a call from Python): fine if they already have n
        have = len(jax.devices("cpu"))
        if have != n:
            raise UsageError(f"--cpu-devices={n} came too late: JAX already started in this process with "
                             f"{have} CPU device(s)") from None


def use_compile_cache(path: str | None) -> str | None:
    """The compile-cache folder (pcp_jax.compile_cache): `path`, or "off", or by default $PCP_JAX_COMPILE_CACHE /
    $XDG_CACHE_HOME/pcp_jax/xla; None when off or not writable (warned once). A bad folder is a bad flag."""
    from pcp_jax import compile_cache
    try:
        return compile_cache.folder(path)
    except ValueError as e:
        raise UsageError(f"--compile-cache={path!r}: {e}") from None


def compile_cache_report(model) -> str:
    """One line on where a model's programs came from: loaded from the store, compiled, kept."""
    s = model.compile_status()
    where = f"kept in {s['store']}" if s["store"] else "none kept on disk: they last only as long as this process"
    pending = f", {s['pending']} still compiling in the background" if s["pending"] else ""
    return f"[programs: {s['loaded']} loaded, {s['compiled']} compiled ({s['stored']} stored){pending}; {where}]"


def read_tokenizer(path: str):
    """A tokenizer.json that exists but cannot be parsed is a failed input (exit 1), named by path."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise RunError(f"cannot read the tokenizer {path!r}: {error_line(e)}") from e


def check_tp(tp: int, cfg=None, model: str | None = None) -> None:
    """--tp must split the model, judged on its config (`cfg`, or read from the folder `model` without the
    weights), so that a bad --tp fails before any weight is read."""
    if tp == 1:
        return
    from pcp_jax.parallel.tensor import check_tp as check
    if cfg is None:
        from pcp_jax.loading import model_config
        try:
            cfg = model_config(model)
        except ValueError:
            return  # not a readable model folder: loading it says why
    try:
        check(cfg, tp)
    except ValueError as e:
        raise UsageError(f"--{e}") from None  # "--tp=3 does not split this model: ..."


def mesh_for(cp: int | None, tp: int):
    """The (cp, tp) mesh over every device of the job (pcp_jax.make_mesh; `cp=None`: every device divided
    by tp). Too few devices, or a share the processes cannot split evenly, is a bad flag."""
    import jax
    from pcp_jax.sharding import make_mesh

    devices, procs = jax.devices(), jax.process_count()
    need = (cp or 1) * tp
    if need > len(devices):
        flags = f"--tp={tp}" if cp is None else f"--cp={cp}" if tp == 1 else f"--cp={cp} x --tp={tp}"
        kind = devices[0].platform
        where = (f"the job has {len(devices)} {kind} device(s) over {procs} process(es)" if procs > 1 else
                 f"{len(devices)} {kind} device(s) are visible (on CPU, --cpu-devices {need})")
        raise UsageError(f"{flags} needs {need} devices but {where}")
    try:
        return make_mesh(cp, tp)
    except ValueError as e:
        raise UsageError(f"--cp/--tp: {e}") from None

"""`pcp-jax` command line: convert, generate, warmup, demo, bench, launch.

Every command reports an error the same way: one line on stderr, `pcp-jax: error: ...`, naming the
offending value and what was expected, and exit code 2 when the command line was rejected (a bad flag or
value, a missing path, a value the library refused before doing any work), 1 when the run itself failed
(an unreadable checkpoint or tokenizer, out of memory, another process of a job that stopped), 128+N when
interrupted by signal N (130 for Ctrl-C). `--debug`, anywhere before a `--`, adds the traceback. Flags are
never abbreviated: `--spawn-loc` is an error, not `--spawn-local`, so that a new flag can never change what
an old command line means.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import traceback
from typing import Callable

EXIT_FAILURE = 1
EXIT_USAGE = 2
PREFIX = "pcp-jax: error"


# The shared error path ----------------------------------------------------------------------------
class UsageError(Exception):
    """A rejected command line: the message names the flag, its value and what was expected; exit 2."""


class RunError(Exception):
    """A run that failed (an unreadable input, a job that fell apart); the message is written for users
    and names what failed; exit 1."""


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's conventions: no abbreviated flags (children of `--spawn-local` and old
    scripts must mean exactly what they spell), every parser accepts `--debug`, and a parse error is a
    UsageError (one line, exit 2) instead of argparse's usage text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, also print the traceback")

    def error(self, message):
        raise UsageError(message)


def wants_debug(argv: list[str]) -> bool:
    """Whether `--debug` was given; read from argv itself so that even a parse error honours it."""
    return "--debug" in (argv[:argv.index("--")] if "--" in argv else argv)


def _signal_of(exc: KeyboardInterrupt) -> int:
    """The signal behind an interruption: a `signum` attribute (the converter sets one for SIGTERM), else
    SIGINT (Ctrl-C)."""
    return getattr(exc, "signum", signal.SIGINT)


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return 128 + _signal_of(exc)  # the shell's convention for "ended by signal N"
    return EXIT_FAILURE


def error_line(exc: BaseException) -> str:
    """One line for any exception. Our own errors and the library's ValueErrors are written for users and
    shown as they are; anything else gets its type name, since its message alone may be cryptic."""
    if isinstance(exc, KeyboardInterrupt):  # its notes say what was left behind
        return "; ".join([f"interrupted by {signal.Signals(_signal_of(exc)).name}", *getattr(exc, "__notes__", [])])
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " [...; --debug shows the rest]"
    if not isinstance(exc, (UsageError, RunError, ValueError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def report_error(exc: BaseException, *, debug: bool, where: str = "") -> int:
    """Print the error line (after the traceback with --debug); returns the exit code."""
    if debug:
        traceback.print_exception(exc)
    print(f"{PREFIX}{where}: {error_line(exc)}", file=sys.stderr, flush=True)
    return exit_code_for(exc)


def run_guarded(body: Callable[[], int], *, debug: bool) -> int:
    """Run a command; turn every exception into one line on stderr and its exit code. SystemExit passes
    (argparse's --help, an explicit exit), except one that carries a message instead of a code."""
    try:
        return body()
    except SystemExit as e:
        if isinstance(e.code, str):
            return report_error(UsageError(e.code), debug=debug)
        raise
    except BaseException as e:  # noqa: BLE001 - the single place every error becomes one line
        return report_error(e, debug=debug)


# Argument types: the message names what was expected; argparse adds the flag -------------------------
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


def require_folder(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{flag}={path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{flag}={path!r} is a file; expected a folder")


# Shared helpers of generate / bench ---------------------------------------------------------------
def _want_cpu_devices(n: int) -> None:
    """Ask XLA for n virtual CPU devices; must run before JAX creates its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def use_compile_cache(path: str | None) -> str | None:
    """The compile-cache folder (pcp_jax.compile_cache): `path`, or "off", or by default
    $PCP_JAX_COMPILE_CACHE / $XDG_CACHE_HOME/pcp_jax/xla. A bad folder is a bad flag."""
    from pcp_jax import compile_cache
    try:
        return compile_cache.folder(path)
    except ValueError as e:
        raise UsageError(f"--compile-cache={path!r}: {e}") from None


def compile_cache_report(model) -> str:
    s = model.compile_status()
    where = f"in {s['store']}" if s["store"] else "none kept on disk"
    return f"[compiled programs: {s['loaded']} loaded, {s['compiled']} compiled ({s['stored']} stored), {where}]"


def chunk_size_arg(text: str):
    """--chunk-size: "auto" (pieces sized from the memory budget), "none" (one piece) or a token count."""
    if text.strip().lower() in ("auto", "none"):
        return text.strip().lower() if text.strip().lower() == "auto" else None
    return int_at_least(1)(text)


def read_tokenizer(path: str):
    """A tokenizer.json that exists but cannot be parsed is a failed input (exit 1), named by path."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise RunError(f"cannot read the tokenizer {path!r}: {error_line(e)}") from e


# Commands -----------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from pcp_jax.convert import ConvertArgumentError, convert
    require_folder(args.hf_dir, "HF_DIR")
    try:
        path = convert(args.hf_dir, args.out_dir, dtype=args.dtype, progress=not args.no_progress)
    except ConvertArgumentError as e:  # OUT_DIR not absent or empty, checked before HF_DIR is read
        raise UsageError(str(e)) from None
    except KeyboardInterrupt as e:  # the converter removed its partial output before raising
        e.add_note(f"nothing was written to {args.out_dir}")
        raise
    print(f"wrote {path}")
    return 0


def _prompt_ids(args):
    """(token ids, tokenizer or None) from --ids or --prompt."""
    from pcp_jax.loading import tokenizer_path

    if (args.prompt is None) == (args.ids is None):
        raise UsageError("give exactly one of --prompt TEXT or --ids 1,2,3")
    if args.ids is not None:
        return args.ids, None
    path = tokenizer_path(args.model)
    if path is None:
        raise UsageError(f"--prompt needs {args.model}/tokenizer.json; pass --ids instead")
    tok = read_tokenizer(path)
    return tok.encode(args.prompt).ids, tok


def _check_mesh(model: str, cp: int, tp: int) -> None:
    """--cp x --tp devices must be visible, and --tp must split the model (its config is read here, so that a
    bad --tp fails before the weights are read)."""
    import jax
    visible = jax.devices()
    flags = f"--cp={cp}" if tp == 1 else f"--cp={cp} x --tp={tp}"
    if cp * tp > len(visible):
        raise UsageError(f"{flags} needs {cp * tp} devices but {len(visible)} {visible[0].platform} device(s) are "
                         f"visible (on CPU, --cpu-devices {cp * tp})")
    if tp > 1:
        from pcp_jax.loading import model_config
        from pcp_jax.parallel.tensor import check_tp
        try:
            cfg = model_config(model)
        except ValueError:
            return  # not a readable model folder: load_model says why
        try:
            check_tp(cfg, tp)
        except ValueError as e:
            raise UsageError(f"--{e}") from None  # "--tp=3 does not split this model: ..."


def cmd_generate(args) -> int:
    import numpy as np

    import pcp_jax

    require_folder(args.model, "--model")
    ids, tok = _prompt_ids(args)
    cache_dir = use_compile_cache(args.compile_cache)
    _check_mesh(args.model, args.cp, args.tp)
    model = pcp_jax.load_model(args.model, cp=args.cp, tp=args.tp, dtype=args.dtype, kernels=args.kernels,
                               decode_attention=args.decode_attention, compile_cache_dir=cache_dir or "off")
    if args.prefix_cache_mb:
        model.enable_prefix_cache(args.prefix_cache_mb << 20)
    if args.warmup:
        stats = model.warmup(args.warmup, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                             logits=False)
        print(f"[warmup: {stats['programs']} programs in {stats['seconds']:.1f} s]", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        out = model.generate(np.asarray([ids]), args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             eos_token_id=model.cfg.eos_token_id if args.eos else None, chunk_size=args.chunk_size)
    except ValueError as e:  # generate checks its arguments before any work: every one of them is a flag
        raise UsageError(str(e)) from e
    dt = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    print(tok.decode(new) if tok is not None else ",".join(map(str, new)))
    print(f"[{len(ids)} prompt tokens, {len(new)} new, {dt:.2f} s, cp={model.cp}, tp={model.tp}]", file=sys.stderr)
    if args.prefix_cache_mb:
        print(f"[prefix cache: {model.prefix_cache_stats()}]", file=sys.stderr)
    if cache_dir:
        print(compile_cache_report(model), file=sys.stderr)
    return 0


def cmd_warmup(args) -> int:
    import pcp_jax

    require_folder(args.model, "--model")
    cache_dir = use_compile_cache(args.compile_cache)
    _check_mesh(args.model, args.cp, args.tp)
    model = pcp_jax.load_model(args.model, cp=args.cp, tp=args.tp, dtype=args.dtype, kernels=args.kernels,
                               decode_attention=args.decode_attention, compile_cache_dir=cache_dir or "off")
    try:
        stats = model.warmup(args.max_tokens, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens,
                             chunk_size=args.chunk_size, logits=args.logits, progress=not args.no_progress)
    except ValueError as e:  # warmup checks its arguments before any work: every one of them is a flag
        raise UsageError(str(e)) from e
    print(f"compiled {stats['programs']} programs in {stats['seconds']:.1f} s (prompts up to {args.max_tokens} "
          f"tokens, batch sizes {list(args.batch_sizes)}, cp={model.cp}, tp={model.tp})")
    print(compile_cache_report(model))
    if not cache_dir:
        print("the compile cache is off: these programs last only as long as this process")
    return 0


def _add_model_flags(p) -> None:
    """Flags that load a model and say where it runs (generate, warmup)."""
    p.add_argument("--model", required=True, help="HF folder or converted folder")
    p.add_argument("--cp", type=int_at_least(1), default=1, help="devices on the context-parallel axis")
    p.add_argument("--tp", type=int_at_least(1), default=1,
                   help="devices on the tensor-parallel axis (each holds 1/tp of the weights); --cp x --tp devices")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--kernels", default="auto", choices=["auto", "jnp", "gpu"])
    p.add_argument("--decode-attention", default="auto", choices=["auto", "dense", "split", "split-sum", "pallas"],
                   help="how decode reads the KV cache ('auto': the Pallas kernel on GPUs, else 'dense')")
    p.add_argument("--cpu-devices", type=int_at_least(1),
                   help="virtual CPU devices (for --cp x --tp > 1 without accelerators)")
    p.add_argument("--chunk-size", type=chunk_size_arg, default="auto",
                   help="prefill pieces: 'auto' (default: sized from the memory budget), 'none' (one piece) "
                   "or a token count")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="JAX's persistent compilation cache: programs compiled once are read back by later runs "
                   "(default: $PCP_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/pcp_jax/xla; 'off' disables it)")


def cmd_demo(args) -> int:
    _want_cpu_devices(args.cp)
    from pcp_jax.demo import run_demo
    return run_demo(args.tokens, args.new_tokens, args.cp)


def build_parser() -> Parser:
    parser = Parser(prog="pcp-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="HF safetensors folder -> Orbax folder",
                       description="Convert a Hugging Face Qwen3.5 folder (config.json + safetensors) into a "
                       "pcp_jax Orbax folder.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new folder (absent or empty)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help="generate from an HF or converted folder")
    _add_model_flags(p)
    p.add_argument("--prompt", help="text (needs tokenizer.json in the model folder)")
    p.add_argument("--ids", type=int_list, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=32)
    p.add_argument("--temperature", type=finite_float(0.0), default=0.0)
    p.add_argument("--top-k", type=int_at_least(1), help="sample among the k most likely tokens (k <= vocabulary)")
    p.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True))
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-eos", dest="eos", action="store_false", help="ignore the model's EOS token")
    p.add_argument("--prefix-cache-mb", type=int_at_least(0), default=0,
                   help="keep prefill KV blocks and GDN states up to this many MiB (reported on stderr)")
    p.add_argument("--warmup", type=int_at_least(1), metavar="N",
                   help="first compile every program prompts up to N tokens need (Model.warmup)")

    p = sub.add_parser("warmup", help="compile every program prompts up to N tokens need, into the compile cache",
                       description="Compile ahead of time every program that prompts of up to --max-tokens tokens "
                       "need (Model.warmup), into JAX's persistent compilation cache, so that later runs read them "
                       "back instead of compiling.")
    _add_model_flags(p)
    p.add_argument("--max-tokens", type=int_at_least(1), required=True, help="longest prompt to prepare for")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1], help="comma-separated batch sizes")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=256, help="decode room to prepare for")
    p.add_argument("--no-logits", dest="logits", action="store_false",
                   help="skip the full-sequence scoring programs (Model.logits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="random small Qwen3.5: long prefill at cp=1 and cp=4, then generation")
    p.add_argument("--tokens", type=int_at_least(1), default=4096, help="prompt length")
    p.add_argument("--new-tokens", type=int_at_least(0), default=32)
    p.add_argument("--cp", type=int_at_least(1), default=4)

    # Listed for --help; their own parsers (pcp_jax.bench, pcp_jax.launch) read their flags.
    sub.add_parser("bench", help="prefill benchmark of a named preset with random weights", add_help=False)
    sub.add_parser("launch", help="multi-process / multi-host run through jax.distributed", add_help=False)
    return parser


_COMMANDS = {"convert": cmd_convert, "generate": cmd_generate, "warmup": cmd_warmup, "demo": cmd_demo}


def _dispatch(argv: list[str]) -> int:
    rest = list(argv)
    debug = []
    while rest and rest[0] == "--debug":  # the global flag, before the command
        debug = [rest.pop(0)]
    if rest and rest[0] == "bench":
        from pcp_jax.bench import bench_command
        return bench_command(rest[1:])
    if rest and rest[0] == "launch":  # its own error path (per process), told about a global --debug
        from pcp_jax.launch import main as launch_main
        return launch_main(rest[1:] + debug)
    args = build_parser().parse_args(rest)
    if args.command in ("generate", "warmup") and args.cpu_devices:
        _want_cpu_devices(args.cpu_devices)
    return _COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: _dispatch(argv), debug=wants_debug(argv))


if __name__ == "__main__":
    # Through the importable module, not this __main__ copy: the error classes must be the ones that the
    # other modules raise.
    from pcp_jax.cli import main as _main
    sys.exit(_main())

"""The command line's error contract, shared by every `pcp-jax` command.

A failure is one line on stderr, `pcp-jax: error: ...` (a process of a multi-process job adds its id:
`pcp-jax: error (process 1): ...`), naming the offending value and what was expected. Exit codes: 2 when the
command line was rejected (a bad flag or value, a missing path, a value the library refused before doing
any work), 1 when the run itself failed (an unreadable checkpoint or tokenizer, out of memory, a job that
fell apart), 128+N when interrupted by signal N (130 for Ctrl-C). `--debug`, anywhere before a `--`, adds the
traceback. Flags are never abbreviated: `--max-new-tok` is an error, not `--max-new-tokens`, so that a new
flag can never change what an old command line means.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from typing import Callable

EXIT_FAILURE = 1
EXIT_USAGE = 2
PREFIX = "pcp-jax: error"


class UsageError(Exception):
    """A rejected command line: the message names the flag, its value and what was expected; exit 2."""


class RunError(Exception):
    """A run that failed (an unreadable input, a job that fell apart); the message is written for users
    and names what failed; exit 1."""


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's conventions: no abbreviated flags (old scripts must mean exactly what they
    spell), every parser accepts `--debug`, and a parse error is a UsageError (one line, exit 2) instead of
    argparse's usage text."""

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


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _signal_of(exc: KeyboardInterrupt) -> int:
    """The signal behind an interruption: a `signum` attribute (set for SIGTERM), else SIGINT (Ctrl-C)."""
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
        return "; ".join([f"interrupted by {signal_name(_signal_of(exc))}", *getattr(exc, "__notes__", [])])
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

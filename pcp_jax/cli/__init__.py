"""`pcp-jax` command line: convert, generate (one process or a job of many), warmup, demo, bench; `launch`
is a deprecated name of generate.

Every command reports an error the same way (pcp_jax.cli.errors): one line on stderr, `pcp-jax: error: ...`,
naming the offending value and what was expected, and exit code 2 when the command line was rejected (a bad
flag or value, a missing path, a value the library refused before doing any work), 1 when the run itself
failed (an unreadable checkpoint or tokenizer, out of memory, another process of a job that stopped), 128+N
when interrupted by signal N (130 for Ctrl-C). `--debug`, anywhere before a `--`, adds the traceback. Flags
are never abbreviated, so that a new flag can never change what an old command line means.
"""

from __future__ import annotations

import argparse
import sys

from pcp_jax.cli import bench, convert, demo, generate, warmup
from pcp_jax.cli.errors import Parser, run_guarded, wants_debug
from pcp_jax.cli.supervise import become_worker


def build_parser() -> Parser:
    parser = Parser(prog="pcp-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (convert, generate, warmup, demo, bench):
        command.add_parser(sub)
    return parser


def _dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.debug = wants_debug(argv)
    args.command_argv = argv[argv.index(args.command) + 1:]  # what follows the command's name
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    become_worker()
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: _dispatch(argv), debug=wants_debug(argv))

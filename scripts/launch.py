#!/usr/bin/env python
"""Multi-process / multi-host launcher: a thin entry to `pcp_jax.launch.main` (same as `pcp-jax launch`).

One process of a job:    python scripts/launch.py --coordinator HOST:PORT --num-processes N --process-id I ...
N processes on this host: python scripts/launch.py --spawn-local N ...
Every flag: python scripts/launch.py --help; recipes for GPUs, hosts and SLURM: docs/multiprocess.md.
An error is one line on stderr (`pcp-jax: error (process I): ...`), exit code 2 for bad arguments and 1
for a failed run; --debug adds tracebacks.
"""

import sys

from pcp_jax.launch import main

if __name__ == "__main__":
    sys.exit(main())

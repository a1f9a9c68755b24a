"""End-to-end prefill benchmark; the same as `pcp-jax bench` (see pcp_jax/bench.py for the flags)."""

import sys

from pcp_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())

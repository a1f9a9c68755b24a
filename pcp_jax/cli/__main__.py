"""`python -m pcp_jax.cli ...`: the same as `pcp-jax ...`."""

import sys

from pcp_jax.cli import main

sys.exit(main())

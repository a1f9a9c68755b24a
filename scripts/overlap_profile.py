"""Print the communication/compute overlap of the latest JAX profiler trace in a folder.

    python scripts/overlap_profile.py $OUT/profile      (written by `pcp-jax bench --profile DIR`)
"""

import sys

from pcp_jax.overlap import report

if __name__ == "__main__":
    print(report(sys.argv[1]))

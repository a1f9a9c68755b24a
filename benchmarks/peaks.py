"""The device figures every benchmark divides by: one table, each figure with its source.

Compute: an 8192³ bf16 matmul measured on this workplace's H100 ran at 799 TFLOP/s (KINDS.md, 2026-11-13);
every "% of peak" and MFU in docs/BENCHMARKS.md uses it. The H200 has the H100's tensor cores (H200.md: the
same arithmetic rates), and KINDS.md records 769-798 TFLOP/s for that product on H200s: one figure serves both.
Memory bandwidth: the vendors' datasheet figures (nominal; the decode benchmark also measures what a copy and
a read reach on the machine it runs on). NVLink: an assumption of the communication model, never measured here.

`pcp-jax bench` keeps its own `--peak` default (the same 799): it is installed, this folder is not.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Device:
    bf16_tflops: float   # dense bf16 matmul, measured (see above)
    hbm_tbps: float      # HBM bandwidth, datasheet


DEVICES = {
    "H100": Device(bf16_tflops=799.0, hbm_tbps=3.35),  # H100 SXM 80GB HBM3
    "H200": Device(bf16_tflops=799.0, hbm_tbps=4.8),
}
BF16_TFLOPS = DEVICES["H200"].bf16_tflops  # the same on both
NVLINK_GBPS = 300.0  # ASSUMED point-to-point NVLink bandwidth per direction (docs/communication.md)


def device(kind: str) -> Device:
    """The row of a JAX `device_kind` ("NVIDIA H200", "NVIDIA H100 80GB HBM3"); ValueError for another GPU."""
    for name, row in DEVICES.items():
        if name in kind:
            return row
    raise ValueError(f"no peak figures for device {kind!r}; known: {sorted(DEVICES)} (benchmarks/peaks.py)")

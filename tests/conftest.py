"""Test setup: 8 virtual CPU devices for `cp` meshes (must be set before JAX creates its backend), and
cheaper XLA CPU compilation: the suite compiles many small programs and runs each only once or twice."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"):
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile into memory only; the persistent-cache test turns a cache folder on explicitly.
os.environ.setdefault("PCP_JAX_COMPILE_CACHE", "off")

"""Test setup: 8 virtual CPU devices for `cp` meshes (must be set before JAX creates its backend), and
cheaper XLA CPU compilation: the suite compiles many small programs and runs each only once or twice."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
# --xla_cpu_parallel_codegen_split_count=1: XLA:CPU can read back the executables it writes only when its
# code generation is not split (pcp_jax/program_store.py), and the store's tests read them back.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_parallel_codegen_split_count=1"):
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile into memory only; the store's tests turn a compile-cache folder on explicitly.
os.environ.setdefault("PCP_JAX_COMPILE_CACHE", "off")

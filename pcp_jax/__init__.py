"""pcp_jax: Qwen3.5 inference in JAX with prefill context parallelism over a `cp` mesh axis."""

import os

from pcp_jax.config import PRESETS, ModelConfig, preset
from pcp_jax.engine import Model, PrefillResult, make_mesh

__all__ = ["PRESETS", "Model", "ModelConfig", "PrefillResult", "load_model", "make_mesh", "preset"]


def load_model(path, *, cp: int = 1, dtype: str = "bfloat16", mesh=None, kernels: str = "auto",
               gdn_strategy: str = "auto", **options) -> Model:
    """Load an HF folder (config.json + safetensors) or a converted Orbax folder onto a `cp` mesh.
    `options` go to `Model` (prefill_budget_bytes, scan_decode, bucket_steps, compile_cache_dir)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from pcp_jax.convert import is_orbax_dir
    from pcp_jax.loading import load_params, load_params_with_digest
    mesh = make_mesh(cp) if mesh is None else mesh
    sharding = NamedSharding(mesh, PartitionSpec())
    if os.path.isdir(os.fspath(path)) and is_orbax_dir(os.fspath(path)):  # the digest stored at conversion
        cfg, params, options["weights_digest"] = load_params_with_digest(path, dtype, sharding)
    else:  # hashed only if the prefix cache asks for a fingerprint
        cfg, params = load_params(path, dtype, sharding)
    return Model(cfg, params, mesh=mesh, dtype=dtype, kernels=kernels, gdn_strategy=gdn_strategy,
                 consume_params=True, **options)

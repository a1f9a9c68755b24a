"""pcp_jax: Qwen3.5 inference in JAX with prefill context parallelism over a `cp` mesh axis and tensor
parallelism over a `tp` mesh axis."""

from pcp_jax.config import PRESETS, ModelConfig, preset
from pcp_jax.engine import Model, PrefillResult
from pcp_jax.sharding import make_mesh

__all__ = ["PRESETS", "Model", "ModelConfig", "PrefillResult", "load_model", "make_mesh", "preset"]


def load_model(path, *, cp: int = 1, tp: int = 1, dtype: str = "bfloat16", mesh=None, kernels: str = "auto",
               gdn_strategy: str = "auto", verify: bool | None = None, **options) -> Model:
    """Load an HF folder (config.json + safetensors) or a converted Orbax folder onto a `cp` x `tp` mesh
    (`make_mesh(cp, tp)` unless `mesh` is given). Each process reads only the blocks of the weights its own
    devices hold (pcp_jax.loading.open_source), so no process holds the whole model. `verify`: converted
    folders' integrity check (None: yes unless PCP_JAX_SKIP_VERIFY=1). `options` go to `Model`
    (prefill_budget_bytes, scan_decode, bucket_steps, compile_cache_dir, decode_attention, weights: what the
    devices hold of an FP8 checkpoint, pcp_jax.fp8)."""
    from pcp_jax.loading import open_source
    from pcp_jax.parallel.tensor import check_tp

    cfg, source, digest = open_source(path, dtype, verify=verify)  # the config and headers only
    if mesh is None:
        check_tp(cfg, tp)  # before any device work: the config decides whether tp splits it
        mesh = make_mesh(cp, tp)
    if digest is not None:  # stored at conversion; an HF folder is hashed only if the prefix cache asks
        options.setdefault("weights_digest", digest)
    return Model(cfg, source, cp=cp, tp=tp, mesh=mesh, dtype=dtype, kernels=kernels, gdn_strategy=gdn_strategy,
                 **options)

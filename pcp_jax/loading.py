"""Find what a model path holds and read its config, flat params and weights digest.

A path (relative or absolute) is either a converted Orbax folder (`pcp_jax.convert.is_orbax_dir`) or a
Hugging Face folder (config.json + model.safetensors or a sharded index).

    model_config(path) -> ModelConfig
    open_source(path, dtype, *, verify=None) -> (ModelConfig, TensorSource, digest or None)
    load_params(path, dtype, sharding=None, *, verify=None) -> (ModelConfig, params)
    load_params_with_digest(path, dtype, sharding=None, *, verify=None) -> (ModelConfig, params, digest)
    weights_digest(params) -> bytes

`open_source` reads only the config and the headers: its source (pcp_jax.convert.sources) reads blocks of
tensors on demand (an FP8 checkpoint's e4m3 weights as stored, with their float32 scales `<name>.scale`), which is how `load_model` places each device's shard without any process holding the whole
model (`pcp_jax.parallel.tensor.place_params`). Its digest is the one stored at conversion for a converted
folder, None for an HF folder (hashing would read every weight; `Model.fingerprint` hashes what it placed,
when asked). `load_params` returns whole tensors: host numpy arrays for HF folders; converted folders restore
straight to the requested sharding (every rank reads the whole checkpoint).

`weights_digest` is a 32-byte sha256 over every tensor's name, dtype, shape and bytes (pcp_jax.convert.digest):
two models share it only if their weights are identical, bit for bit, in the same dtype. For a converted
folder `load_params_with_digest` returns the digest stored at conversion (weights in the stored dtype; the
`dtype` they are loaded in is not part of it, so keys should include it); for an HF folder it hashes the
params as read in `dtype` (one extra pass over the weights in host memory, several threads).

`verify` (converted folders only): compare every checkpoint file with the digests recorded at conversion
before restoring it; None -> yes unless the environment sets PCP_JAX_SKIP_VERIFY=1.
"""

from __future__ import annotations

import os

from pcp_jax.config import ModelConfig


def weights_digest(params: dict) -> bytes:
    """sha256 digest (32 bytes) of flat params {name: numpy array or fully addressable jax.Array}, independent
    of dict order; tensors are hashed one at a time."""
    from pcp_jax.convert import weights_digest as digest
    return digest(params)


def model_config(path) -> ModelConfig:
    """The config of an HF or converted folder, reading nothing else."""
    from pcp_jax.convert import load_hf_config, read_orbax_config

    path, kind = _model_folder(path)
    return read_orbax_config(path)[0] if kind == "orbax" else load_hf_config(path)


def open_source(path, dtype: str, *, verify: bool | None = None):
    """(config, TensorSource, digest or None) of an HF or converted folder; blocks are read in `dtype`.
    Only the config and the checkpoint's headers are read here (and, for an HF folder with a stored tied
    lm_head, the embedding and that head, compared in blocks)."""
    from pcp_jax.convert import load_hf_config
    from pcp_jax.convert.sources import OrbaxSource, SafetensorsSource

    path, kind = _model_folder(path)
    if kind == "orbax":
        source = OrbaxSource(path, verify=verify, dtype=dtype)
        return source.cfg, source, source.weights_digest
    cfg = load_hf_config(path)
    return cfg, SafetensorsSource(path, cfg, dtype), None


def load_params(path, dtype: str, sharding=None, *, verify: bool | None = None) -> tuple[ModelConfig, dict]:
    """(config, flat params) of an HF or converted folder; params in `dtype`, on `sharding` for converted
    folders (host numpy arrays for HF folders)."""
    cfg, params, _ = _load(path, dtype, sharding, verify, with_digest=False)
    return cfg, params


def load_params_with_digest(path, dtype: str, sharding=None, *, verify: bool | None = None
                            ) -> tuple[ModelConfig, dict, bytes]:
    """`load_params` plus the `weights_digest` of the weights (see the module docstring)."""
    return _load(path, dtype, sharding, verify, with_digest=True)


def _load(path, dtype, sharding, verify, with_digest: bool):
    from pcp_jax.convert import load_hf_config, load_orbax, read_hf_params, stored_weights_digest
    from pcp_jax.convert import weights_digest as digest

    path, kind = _model_folder(path)
    if kind == "orbax":
        cfg, params = load_orbax(path, shardings=sharding, dtype=dtype, verify=verify)
        return cfg, params, stored_weights_digest(path) if with_digest else None
    cfg = load_hf_config(path)
    params = read_hf_params(path, cfg, dtype)
    return cfg, params, digest(params) if with_digest else None


def _model_folder(path) -> tuple[str, str]:
    """(absolute path, "orbax" | "hf") of a model folder; ValueError naming it when it is neither."""
    from pcp_jax.convert import is_orbax_dir

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a folder (expected an HF folder with config.json "
                         f"and safetensors, or a folder made by `pcp-jax convert`)")
    if is_orbax_dir(path):
        return path, "orbax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, "hf"
    raise ValueError(f"{path!r} holds neither config.json (HF folder) nor a converted checkpoint")


def tokenizer_path(path) -> str | None:
    p = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(path))), "tokenizer.json")
    return p if os.path.isfile(p) else None

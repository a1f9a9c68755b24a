"""Find what a model path holds and read its config and flat params.

A path is either a converted Orbax folder (`pcp_jax.convert.is_orbax_dir`) or a Hugging Face folder
(config.json + model.safetensors or a sharded index). Orbax folders restore straight to the requested
sharding (every rank reads the checkpoint; parameters are replicated over `cp`).
"""

from __future__ import annotations

import os

from pcp_jax.config import ModelConfig


def load_params(path, dtype: str, sharding=None) -> tuple[ModelConfig, dict]:
    from pcp_jax.convert import is_orbax_dir, load_hf_config, load_orbax, read_hf_params

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a folder (expected an HF folder with config.json "
                         f"and safetensors, or a folder made by `pcp-jax convert`)")
    if is_orbax_dir(path):
        return load_orbax(path, shardings=sharding, dtype=dtype)
    if os.path.isfile(os.path.join(path, "config.json")):
        cfg = load_hf_config(path)
        return cfg, read_hf_params(path, cfg, dtype)
    raise ValueError(f"{path!r} holds neither config.json (HF folder) nor a converted checkpoint")


def tokenizer_path(path) -> str | None:
    p = os.path.join(os.fspath(path), "tokenizer.json")
    return p if os.path.isfile(p) else None

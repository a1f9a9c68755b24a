"""pcp_jax.convert: Hugging Face Qwen3.5 safetensors -> our flat params and Orbax checkpoints.

Flat params: `{name: np.ndarray}`, input-major, names and shapes in `hf_names` (and
`expected_shapes(cfg)`). Public surface:

    read_hf_params(hf_dir, cfg=None, dtype="bfloat16") -> dict[str, np.ndarray]
    iter_hf_params(hf_dir, cfg=None, dtype="bfloat16") -> Iterator[(name, np.ndarray)]
    convert(hf_dir, out_dir, dtype="bfloat16", progress=True) -> str
    is_orbax_dir(path) -> bool
    save_orbax(out_dir, cfg, params_iter, dtype="bfloat16", *, extra_files=None, progress=False) -> str
    load_orbax(path, *, shardings=None, dtype=None, verify=None) -> (ModelConfig, dict[str, array])
    read_orbax_config(path, *, verify=None) -> (ModelConfig, dtype name)
    stored_weights_digest(path) -> bytes        (the weights digest recorded at conversion)
    SafetensorsSource(hf_dir, cfg=None, dtype="bfloat16"), OrbaxSource(path, *, verify=None, dtype=None)
                                                (blocks of tensors without reading them whole: sources.py)
    weights_digest(params) -> bytes             (sha256 of flat params: convert/digest.py)

Every user-facing failure is a `ConvertError` (a ValueError) whose message names what is wrong (a
`ConvertArgumentError` when an argument itself is unusable, e.g. a non-empty OUT_DIR); SIGINT or
SIGTERM during a conversion raise `ConvertInterrupted` (a KeyboardInterrupt) after the partial output is
removed. Guarantees: docs/errors.md.
"""

from .converter import convert
from .digest import weights_digest
from .errors import ConvertArgumentError, ConvertError, ConvertInterrupted
from .hf_loader import iter_hf_params, load_hf_config, read_hf_params
from .hf_names import expected_shapes
from .orbax_io import is_orbax_dir, load_orbax, read_orbax_config, save_orbax, stored_weights_digest
from .sources import OrbaxSource, SafetensorsSource

__all__ = [
    "ConvertArgumentError", "ConvertError", "ConvertInterrupted", "OrbaxSource", "SafetensorsSource", "convert",
    "expected_shapes", "is_orbax_dir", "iter_hf_params", "load_hf_config", "load_orbax", "read_hf_params",
    "read_orbax_config", "save_orbax", "stored_weights_digest", "weights_digest",
]

"""`convert(hf_dir, out_dir, dtype)`: a Hugging Face Qwen3.5 folder -> our Orbax folder, streamed.

Order of work, so that every input error surfaces before anything is written:
1. the dtype and OUT_DIR are checked (OUT_DIR must be absent in an existing folder, or an empty directory;
   a ConvertArgumentError otherwise, which the CLI reports as a bad command line);
2. config.json and every safetensors header are read and matched against the config (`hf_names.plan`):
   a quantized checkpoint (`quantization`), unexpected, missing, wrongly shaped or non-float tensors,
   corrupt/truncated files and missing shards all fail here, naming what is wrong;
3. tensors are streamed one by one (`iter_hf_params`) into one Orbax checkpoint per layer/top-level tensor
   (`save_orbax`), in a temporary sibling folder renamed to OUT_DIR only on success; a tensor holding NaN or
   infinite values stops the conversion, naming it; SIGINT/SIGTERM remove the folder (ConvertInterrupted),
   and a later conversion removes the ones killed runs left (`workdir`).

Peak host memory is about the largest unit (one layer's tensors, or the embedding / lm_head, in the
output dtype), which Orbax writes without copying, plus the mapped pages of the one HF tensor being
copied. It does not grow with the number of layers; see docs/convert.md for the measurements.
"""

from __future__ import annotations

import os

from .errors import ConvertError
from .hf_loader import load_hf_config, open_hf_checkpoint, resolve_dtype, stream_params
from .orbax_io import check_out_dir, save_orbax

# Small files of an HF folder that a converted folder keeps, so it can be used without the original.
# config.json is kept as hf_config.json: a folder holding config.json would look like an HF folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json")


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16",
            progress: bool = True) -> str:
    """Convert the HF folder `hf_dir` into a new converted folder `out_dir` of `dtype` ("bfloat16" or
    "float32"); both paths may be relative. Returns the absolute path of `out_dir`. Raises ConvertError,
    or ConvertInterrupted on SIGINT/SIGTERM; on either OUT_DIR is untouched."""
    hf_dir = os.path.abspath(os.fspath(hf_dir))
    resolve_dtype(dtype)
    out_dir = check_out_dir(out_dir)
    cfg = load_hf_config(hf_dir)
    _, ckpt, the_plan = open_hf_checkpoint(hf_dir, cfg)
    params = stream_params(ckpt, the_plan, resolve_dtype(dtype))
    extra = {name: os.path.join(hf_dir, name) for name in TOKENIZER_FILES
             if os.path.isfile(os.path.join(hf_dir, name))}
    extra["hf_config.json"] = os.path.join(hf_dir, "config.json")
    fp8 = [name for name, source in the_plan.sources.items() if source.kind == "fp8"]
    return save_orbax(out_dir, cfg, params, dtype, extra_files=extra, progress=progress, fp8=fp8)

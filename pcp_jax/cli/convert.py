"""`pcp-jax convert HF_DIR OUT_DIR`: a Hugging Face Qwen3.5 folder into a pcp_jax Orbax folder."""

from __future__ import annotations

from pcp_jax.cli.args import require_folder
from pcp_jax.cli.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="HF safetensors folder -> Orbax folder",
                       description="Convert a Hugging Face Qwen3.5 folder (config.json + safetensors) into a "
                       "pcp_jax Orbax folder.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new folder (absent or empty)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from pcp_jax.convert import ConvertArgumentError, convert
    require_folder(args.hf_dir, "HF_DIR")
    try:
        path = convert(args.hf_dir, args.out_dir, dtype=args.dtype, progress=not args.no_progress)
    except ConvertArgumentError as e:  # OUT_DIR not absent or empty, checked before HF_DIR is read
        raise UsageError(str(e)) from None
    except KeyboardInterrupt as e:  # the converter removed its partial output before raising
        e.add_note(f"nothing was written to {args.out_dir}")
        raise
    print(f"wrote {path}")
    return 0

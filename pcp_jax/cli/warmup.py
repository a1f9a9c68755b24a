"""`pcp-jax warmup`: compile every program that prompts up to N tokens need, into the compile cache."""

from __future__ import annotations

from pcp_jax.cli.args import (add_placement_flags, check_tp, compile_cache_report, int_at_least, mesh_for,
                              positive_int_list, require_folder, set_cpu_devices, use_compile_cache)
from pcp_jax.cli.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("warmup", help="compile every program prompts up to N tokens need, into the compile cache",
                       description="Compile ahead of time every program that prompts of up to --max-tokens tokens "
                       "need (Model.warmup), into the compile cache's store of executables, so that later runs load them "
                       "instead of tracing and compiling them.")
    p.add_argument("--model", required=True, help="HF folder or converted folder")
    add_placement_flags(p, cp_default=1, cp_help="devices on the context-parallel axis")
    p.add_argument("--max-tokens", type=int_at_least(1), required=True, help="longest prompt to prepare for")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1], help="comma-separated batch sizes")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=256, help="decode room to prepare for")
    p.add_argument("--no-logits", dest="logits", action="store_false",
                   help="skip the full-sequence scoring programs (Model.logits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    import pcp_jax

    require_folder(args.model, "--model")
    set_cpu_devices(args.cpu_devices)
    cache_dir = use_compile_cache(args.compile_cache)
    check_tp(args.tp, model=args.model)
    mesh = mesh_for(args.cp, args.tp)
    model = pcp_jax.load_model(args.model, mesh=mesh, dtype=args.dtype, kernels=args.kernels,
                               decode_attention=args.decode_attention, compile_cache_dir=cache_dir or "off")
    try:
        stats = model.warmup(args.max_tokens, batch_sizes=args.batch_sizes, max_new_tokens=args.max_new_tokens,
                             chunk_size=args.chunk_size, logits=args.logits, progress=not args.no_progress)
    except ValueError as e:  # warmup checks its arguments before any work: every one of them is a flag
        raise UsageError(str(e)) from e
    print(f"ready for prompts up to {args.max_tokens} tokens after {stats['ready_seconds']:.1f} s (coarse ladder); all "
          f"{stats['programs']} programs ({stats['loaded']} loaded, {stats['compiled']} compiled) after "
          f"{stats['seconds']:.1f} s (batch sizes {list(args.batch_sizes)}, cp={model.cp}, tp={model.tp})")
    print(compile_cache_report(model))
    return 0

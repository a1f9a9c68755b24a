"""`pcp-jax` command line: convert, generate, demo, bench, launch."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"pcp-jax: error: --ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise SystemExit("pcp-jax: error: --ids is empty")
    return ids


def _want_cpu_devices(n: int) -> None:
    """Ask XLA for n virtual CPU devices; must run before JAX creates its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


_CACHE_COUNTS = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}


def use_compile_cache(path: str | None) -> None:
    """Keep compiled programs in `path` across processes (JAX's persistent compilation cache): a prompt
    length compiled once is not compiled again by the next run. Every program is kept, however small.
    Hits and misses are counted for `compile_cache_report`."""
    if not path:
        return
    import jax
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    def count(event, **_):
        if event in _CACHE_COUNTS:
            _CACHE_COUNTS[event] += 1

    jax.monitoring.register_event_listener(count)


def compile_cache_report() -> str:
    return (f"[compile cache: {_CACHE_COUNTS['/jax/compilation_cache/cache_hits']} programs read, "
            f"{_CACHE_COUNTS['/jax/compilation_cache/cache_misses']} compiled and stored]")


def cmd_generate(args) -> int:
    import numpy as np

    import pcp_jax
    from pcp_jax.loading import tokenizer_path

    if (args.prompt is None) == (args.ids is None):
        print("pcp-jax generate: error: give exactly one of --prompt TEXT or --ids 1,2,3", file=sys.stderr)
        return 2
    tok = None
    if args.prompt is not None:
        path = tokenizer_path(args.model)
        if path is None:
            print(f"pcp-jax generate: error: --prompt needs {args.model}/tokenizer.json; pass --ids instead",
                  file=sys.stderr)
            return 2
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(path)
        ids = tok.encode(args.prompt).ids
    else:
        ids = _parse_ids(args.ids)
    use_compile_cache(args.compile_cache)
    try:
        model = pcp_jax.load_model(args.model, cp=args.cp, dtype=args.dtype, kernels=args.kernels)
        if args.prefix_cache_mb:
            model.enable_prefix_cache(args.prefix_cache_mb << 20)
        t0 = time.perf_counter()
        out = model.generate(np.asarray([ids]), args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             eos_token_id=model.cfg.eos_token_id if args.eos else None, chunk_size=args.chunk_size)
    except ValueError as e:
        print(f"pcp-jax generate: error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    print(tok.decode(new) if tok is not None else ",".join(map(str, new)))
    print(f"[{len(ids)} prompt tokens, {len(new)} new, {dt:.2f} s, cp={model.cp}]", file=sys.stderr)
    if args.prefix_cache_mb:
        print(f"[prefix cache: {model.prefix_cache_stats()}]", file=sys.stderr)
    if args.compile_cache:
        print(compile_cache_report(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcp-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="HF safetensors folder -> Orbax folder", add_help=False)
    p = sub.add_parser("generate", help="generate from an HF or converted folder")
    p.add_argument("--model", required=True, help="HF folder or converted folder")
    p.add_argument("--prompt", help="text (needs tokenizer.json in the model folder)")
    p.add_argument("--ids", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cp", type=int, default=1, help="devices on the context-parallel axis")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--kernels", default="auto", choices=["auto", "jnp", "gpu"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eos", dest="eos", action="store_false", help="ignore the model's EOS token")
    p.add_argument("--cpu-devices", type=int, help="virtual CPU devices (for --cp > 1 without accelerators)")
    p.add_argument("--chunk-size", type=int, help="prefill the prompt in pieces of this many tokens")
    p.add_argument("--prefix-cache-mb", type=int, default=0,
                   help="keep prefill KV blocks and GDN states up to this many MiB (reported on stderr)")
    p.add_argument("--compile-cache", metavar="DIR", help="keep compiled programs in DIR for later runs (JAX's "
                   "persistent compilation cache; a 9B prefill compiles for about a minute per prompt length)")

    p = sub.add_parser("demo", help="random small Qwen3.5: long prefill at cp=1 and cp=4, then generation")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cp", type=int, default=4)

    sub.add_parser("bench", help="prefill benchmark of a named preset with random weights", add_help=False)
    sub.add_parser("launch", help="multi-process / multi-host run through jax.distributed", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":
        from pcp_jax.convert import main_convert
        return main_convert(argv[1:])
    if argv and argv[0] == "bench":
        from pcp_jax.bench import main as bench_main
        return bench_main(argv[1:])
    if argv and argv[0] == "launch":
        from pcp_jax.launch import main as launch_main
        return launch_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.cpu_devices:
            _want_cpu_devices(args.cpu_devices)
        return cmd_generate(args)
    if args.command == "demo":
        _want_cpu_devices(max(args.cp, 1))
        from pcp_jax.demo import run_demo
        return run_demo(args.tokens, args.new_tokens, args.cp)
    return 2


if __name__ == "__main__":
    sys.exit(main())

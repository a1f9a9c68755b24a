"""Measure the host memory of `convert` on a random model written by transformers.

    python benchmarks/convert_memory.py [--layers 16] [--hidden 1024] [--experts 0] [--dtype bfloat16]

Builds a random Qwen3.5 model in a child process and saves it (bf16, 2 GB shards), then converts it in a
fresh child process and reports, next to the model's and its largest layer's bytes (output dtype):
- `rss_peak - rss_before`: growth of the process high-water mark (VmHWM) across `convert`;
- `anon_peak - anon_before`: growth of anonymous resident memory (RssAnon, sampled every 2 ms), which
  leaves out the memory-mapped safetensors pages (file-backed, reclaimable by the kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _make(hf_dir: str, args) -> None:
    import torch
    from transformers import (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig,
                              Qwen3_5TextConfig)

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=4,
                  linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128)
    torch.manual_seed(0)
    if args.experts:
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(
            **common, num_experts=args.experts, num_experts_per_tok=2, moe_intermediate_size=args.ffn // 8,
            shared_expert_intermediate_size=args.ffn // 8))
    else:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**common, intermediate_size=args.ffn))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size="2GB")


def _measure(hf_dir: str, out_dir: str, dtype: str) -> dict:
    import numpy as np

    from pcp_jax.convert import convert, expected_shapes, load_hf_config

    cfg = load_hf_config(hf_dir)
    itemsize = 4 if dtype == "float32" else 2
    shapes = expected_shapes(cfg)
    layer_bytes = max(sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith(f"layers.{i}."))
                      for i in range(cfg.num_layers)) * itemsize
    model_bytes = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    largest_global = max(int(np.prod(shapes[n])) for n in ("embed", "final_norm", "lm_head") if n in shapes) * itemsize

    anon_before, rss_before = _status("RssAnon"), _status("VmRSS")
    anon_peak, done = [anon_before], threading.Event()

    def sample():
        while not done.is_set():
            anon_peak[0] = max(anon_peak[0], _status("RssAnon"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    convert(hf_dir, out_dir, dtype=dtype, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    mib = 2**20
    return dict(model_MiB=round(model_bytes / mib, 1), largest_layer_MiB=round(layer_bytes / mib, 1),
                largest_global_MiB=round(largest_global / mib, 1),
                rss_growth_MiB=round((_status("VmHWM") - rss_before) / mib, 1),
                anon_growth_MiB=round((anon_peak[0] - anon_before) / mib, 1), seconds=round(seconds, 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096, help="intermediate_size (MoE: 8 x expert size)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--_role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--_dirs", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._role == "make":
        _make(args._dirs[0], args)
        return
    if args._role == "measure":
        print(json.dumps(_measure(args._dirs[0], args._dirs[1], args.dtype)))
        return
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    with tempfile.TemporaryDirectory(prefix="pcp_convert_mem_") as tmp:
        hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "out")
        me = [sys.executable, os.path.abspath(__file__), *forwarded]
        subprocess.run([*me, "--_role", "make", "--_dirs", hf_dir, out_dir], check=True)
        result = subprocess.run([*me, "--_role", "measure", "--_dirs", hf_dir, out_dir], check=True,
                                capture_output=True, text=True)
        print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

"""The `pcp-jax` command line and `ModelConfig.from_hf`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pcp_jax.config import PRESETS, ModelConfig
from pcp_jax.weights import param_shapes
from hf_models import build


def cli(*args, timeout=300):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "pcp_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_runs_and_cp_agrees():
    r = cli("demo", "--tokens", "384", "--new-tokens", "4", "--cp", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RANDOM-WEIGHT" in r.stdout and "agree" in r.stdout and "generated 4 tokens" in r.stdout


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    path = tmp_path_factory.mktemp("hf")
    model = build(seed=3)
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return model, path


def test_generate_with_ids_and_prompt_matches_api(hf_folder):
    import pcp_jax
    model, path = hf_folder
    ref = pcp_jax.load_model(path, dtype="float32").generate(np.array([[5, 6, 7]]), 5)[0, 3:]
    r = cli("generate", "--model", str(path), "--ids", "5,6,7", "--max-new-tokens", "5", "--dtype", "float32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ",".join(map(str, ref))
    r = cli("generate", "--model", str(path), "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--dtype", "float32",
            "--cp", "2", "--chunk-size", "128", "--prefix-cache-mb", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [f"w{i}" for i in ref]
    assert "prefix cache" in r.stderr


def test_generate_with_compile_cache_reuses_programs(hf_folder, tmp_path):
    import re
    _, path = hf_folder
    args = ("generate", "--model", str(path), "--ids", "5,6,7", "--max-new-tokens", "3", "--dtype", "float32",
            "--compile-cache", str(tmp_path / "xla"))
    counts = lambda r: tuple(map(int, re.search(r"programs: (\d+) loaded, (\d+) compiled \((\d+) stored\)",
                                                r.stderr).groups()))
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    loaded, compiled, stored = counts(first)
    assert compiled == stored > 0 and loaded == 0, first.stderr
    second = cli(*args)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert counts(second) == (compiled, 0, 0), second.stderr  # every program loaded, none compiled


def test_generate_errors(hf_folder, tmp_path):
    _, path = hf_folder
    def one_line(r, code, text):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and len(lines) == 1 and text in lines[0], r.stderr[-2000:]

    # generate's own argument checks reject the id: a bad flag (2); a folder with no model: a failed load (1)
    one_line(cli("generate", "--model", str(path), "--ids", "5,6,999", "--max-new-tokens", "2"), 2, "out of range")
    one_line(cli("generate", "--model", str(tmp_path), "--ids", "1", "--max-new-tokens", "2"), 1, "neither config.json")
    one_line(cli("generate", "--model", str(path), "--max-new-tokens", "2"), 2, "exactly one of --prompt")


def test_convert_cli_error_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    r = cli("convert", str(tmp_path / "missing"), str(out))
    assert r.returncode == 2 and r.stderr.startswith("pcp-jax: error: HF_DIR=")
    assert not out.exists()


def test_bench_cli_on_cpu(tmp_path):
    r = cli("bench", "--preset", "demo", "--tokens", "256", "--reps", "1", "--compile-cache", str(tmp_path / "cc"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 256 |" in r.stdout
    assert list((tmp_path / "cc" / "executables").glob("*.exe")), "--compile-cache: the programs were not kept there"


def test_bench_decode_and_profile_on_cpu(tmp_path):
    r = cli("bench", "--preset", "demo", "--tokens", "256", "--reps", "1", "--decode", "2",
            "--profile", str(tmp_path / "prof"))
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| 256 |"))
    assert float(row.split("|")[7]) > 0 and float(row.split("|")[8]) > 0  # decode step, generate per token
    assert list((tmp_path / "prof").rglob("*.xplane.pb"))
    assert "no GPU device planes" in r.stdout


def test_overlap_summary_counts_only_covered_collective_time():
    from pcp_jax.overlap import merge_intervals, overlap_summary
    assert merge_intervals([(5, 9), (0, 3), (2, 4), (9, 10), (12, 12)]) == [(0, 4), (5, 10)]
    kernels = [("ncclDevKernel_SendRecv", 0, 100), ("fmha_fwd", 20, 50), ("gemm", 40, 70),
               ("ncclDevKernel_SendRecv", 200, 210), ("gemm", 300, 400)]
    s = overlap_summary(kernels)
    assert s["comm_kernels"] == 2 and s["comm_ns"] == 110
    assert s["overlapped_ns"] == 50 and s["exposed_ns"] == 60
    assert s["compute_ns"] == 150 and s["span_ns"] == 400


def _hf_dict(**kw):
    d = dict(model_type="qwen3_5_text", vocab_size=10, hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=4, intermediate_size=16, linear_num_key_heads=1,
             linear_num_value_heads=2, linear_key_head_dim=4, linear_value_head_dim=4,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    d.update(kw)
    return d


def test_config_from_hf_variants():
    cfg = ModelConfig.from_hf(_hf_dict())
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.rotary_dim == 2 and not cfg.is_moe
    legacy = _hf_dict(rope_parameters=None, rope_theta=5.0, partial_rotary_factor=1.0, full_attention_interval=2)
    cfg = ModelConfig.from_hf(legacy)
    assert cfg.rope_theta == 5.0 and cfg.rotary_dim == 4 and cfg.attention_layers == (1, 3)
    nested = {"model_type": "qwen3_5", "text_config": _hf_dict(), "tie_word_embeddings": True}
    assert ModelConfig.from_hf(nested).tie_word_embeddings
    moe = _hf_dict(model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                   shared_expert_intermediate_size=8)
    assert ModelConfig.from_hf(moe).is_moe
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("change,message", [
    (dict(model_type="llama"), "unsupported model_type 'llama'"),
    (dict(hidden_size=None), "missing required field 'hidden_size'"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(linear_num_key_heads=2, linear_num_value_heads=3), "linear_num_value_heads=3 is not a multiple"),
    (dict(layer_types=["full_attention"]), "layer_types has 1 entries"),
    (dict(layer_types=["full_attention", "mamba", "full_attention", "full_attention"]), "unknown layer_types"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "rope_type 'linear'"),
    (dict(model_type="qwen3_5_moe_text"), "missing required field 'num_experts'"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        ModelConfig.from_hf(_hf_dict(**change))


def test_presets_have_the_real_shapes():
    nine = PRESETS["qwen3.5-9b"]
    assert (nine.hidden_size, nine.num_layers, nine.num_heads, nine.num_kv_heads, nine.head_dim,
            nine.intermediate_size, nine.linear_num_key_heads, nine.linear_num_value_heads, nine.vocab_size) == (
        4096, 32, 16, 4, 256, 12288, 16, 32, 248320)
    big = PRESETS["qwen3.5-397b-a17b"]
    assert (big.num_layers, big.num_heads, big.num_kv_heads, big.linear_num_value_heads, big.num_experts,
            big.num_experts_per_tok, big.moe_intermediate_size, len(big.attention_layers)) == (
        60, 32, 2, 64, 512, 10, 1024, 15)
    n_params = sum(int(np.prod(s)) for s in param_shapes(nine).values())
    assert 8.5e9 < n_params < 10.5e9, n_params


def test_sharding_rules_name_each_mesh_axis_once():
    from jax.sharding import PartitionSpec
    from pcp_jax.sharding import CACHES, KV_SLOTS, RULES, TOKENS
    assert TOKENS == PartitionSpec(None, "cp") and KV_SLOTS == PartitionSpec(None, "cp")
    assert CACHES["k"] == PartitionSpec(None, None, "cp", "tp") and CACHES["state"] == PartitionSpec(None, None, "tp")
    with pytest.raises(ValueError, match="two dimensions on one mesh axis"):
        RULES.spec("sequence", "kv_slots")
    with pytest.raises(ValueError, match="two dimensions on one mesh axis"):
        RULES.spec("heads", "channels")
    with pytest.raises(ValueError, match="unknown logical axis 'experts'"):
        RULES.spec("batch", "experts")

"""What the compiled prefill does under cp: per-device memory falls at least as fast as 1/C for a fixed
long prompt, and K/V move with collective-permute (no all-gather of sequence-sized arrays)."""

import re

import pytest

from pcp_jax.engine import Model
from pcp_jax.programs import Prefill
from tiny import tiny_config, tiny_params

N = 4096


def compiled_prefill(cp, strategy="sequence"):
    cfg = tiny_config(hidden_size=64, intermediate_size=128)
    model = Model(cfg, tiny_params(cfg), cp=cp, dtype="float32", gdn_strategy=strategy)
    B = 1 if strategy == "sequence" else cp
    return model.programs.lower(Prefill(B, N, N // cp, False, False)).compile()


def test_per_device_memory_falls_as_one_over_cp():
    mem = {c: compiled_prefill(c).memory_analysis().temp_size_in_bytes for c in (1, 2, 4, 8)}
    for c in (2, 4, 8):
        assert mem[c] * c <= 1.25 * mem[1], mem
        assert mem[c] < mem[c // 2], mem


@pytest.mark.parametrize("strategy", ["sequence", "batch"])
def test_kv_moves_by_collective_permute_not_all_gather(strategy):
    hlo = compiled_prefill(4, strategy).as_text()
    t_local = N // 4
    permutes = [l for l in hlo.splitlines() if "collective-permute(" in l or "collective-permute-start(" in l]
    kv_shape = re.compile(rf"f32\[\d+,{t_local},2,16\]")  # [B, local tokens, kv heads, head_dim]
    assert any(kv_shape.search(l) for l in permutes), "K/V are not moved by collective-permute"
    for line in hlo.splitlines():
        if "all-gather(" in line or "all-gather-start(" in line:
            dims = [int(d) for shape in re.findall(r"\[([\d,]+)\]", line.split("all-gather")[0])
                    for d in shape.split(",") if d]
            assert max(dims, default=0) < t_local, f"sequence-sized all-gather: {line.strip()[:200]}"


@pytest.mark.parametrize("cp", [1, 4])
def test_chunked_prefill_memory_follows_the_piece_not_the_prompt(cp):
    """One prefill piece of S tokens after earlier pieces: its temporary memory is the same whether the
    cache behind it holds 4 or 64 pieces (the cache itself is a donated argument, updated in place)."""
    cfg = tiny_config(hidden_size=64, intermediate_size=128)
    model = Model(cfg, tiny_params(cfg), cp=cp, dtype="float32")
    S = 1024
    temp = {}
    for pieces in (4, 64):
        compiled = model.programs.lower(Prefill(1, S, pieces * S // cp, False, True)).compile()
        temp[pieces] = compiled.memory_analysis().temp_size_in_bytes
    cache_growth = 60 * S // cp * 2 * len(cfg.attention_layers) * cfg.num_kv_heads * cfg.head_dim * 4
    assert temp[64] - temp[4] < 0.05 * cache_growth, (temp, cache_growth)

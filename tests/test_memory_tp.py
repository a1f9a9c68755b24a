"""Memory per device under tensor parallelism (pcp_jax.memory with tp > 1), from configs alone: no model is
built. The expected figures are written out by hand from the scheme in docs/communication.md (heads,
intermediates, experts and vocabulary split over tp; KV / GDN key heads fewer than tp replicated, one per rank;
norms, router and shared_gate whole on every rank)."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

from pcp_jax.config import PRESETS, preset
from pcp_jax.memory import (format_memory_report, gdn_state_bytes, kv_bytes_per_token, memory_estimate,
                            weights_bytes_per_device)
from pcp_jax.parallel.tensor import check_tp, device_shapes, placements
from pcp_jax.weights import declare, param_shapes

LARGE = ("qwen3.5-27b", "qwen3.5-35b-a3b", "qwen3.5-122b-a10b", "qwen3.5-397b-a17b")
TPS = (1, 2, 4, 8)


def _valid_tp(cfg, tp) -> bool:
    """The tensor-parallel validity rule, spelled out (the library's check lives in pcp_jax.parallel.tensor)."""
    split = [cfg.num_heads, cfg.linear_num_value_heads, cfg.vocab_size]
    split += [cfg.shared_expert_intermediate_size, cfg.num_experts] if cfg.is_moe else [cfg.intermediate_size]
    heads = (cfg.num_kv_heads, cfg.linear_num_key_heads)
    return all(n % tp == 0 for n in split) and all(h % tp == 0 or tp % h == 0 for h in heads)


def _whole_bytes(cfg, b) -> int:
    """Bytes of the tensors every tp rank holds whole: 1-D norms (not A_log / dt_bias, which are per value
    head), the router and shared_gate."""
    return sum(math.prod(s) for n, s in param_shapes(cfg).items()
               if len(s) == 1 and not n.endswith(("A_log", "dt_bias"))
               or n.endswith(("moe.router", "moe.shared_gate"))) * b


def _extra_head_bytes(cfg, tp, b) -> float:
    """Bytes each tp rank holds beyond its 1/tp share of k_proj / v_proj and of the key columns of
    in_proj_qkv / conv_weight where KV or GDN key heads are fewer than tp (one head per rank, not heads/tp)."""
    D = cfg.hidden_size
    kv = 2 * D * cfg.head_dim * max(0, 1 - cfg.num_kv_heads / tp) * len(cfg.attention_layers)
    key = 2 * (D + cfg.conv_kernel) * cfg.linear_key_head_dim * max(0, 1 - cfg.linear_num_key_heads / tp) \
        * len(cfg.gdn_layers)
    return (kv + key) * b


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("qwen3.5")))
def test_every_released_size_splits_over_1_2_4_8(name):
    assert all(_valid_tp(PRESETS[name], tp) for tp in TPS)


@pytest.mark.parametrize("name", ["qwen3.5-9b", "qwen3.5-397b-a17b"])
@pytest.mark.parametrize("tp", TPS)
def test_memory_counts_the_shapes_the_loader_places(name, tp):
    """Each tensor's shape on one rank (what memory counts) is its mesh shape as placed at load, split in tp
    equal blocks along the declared axis; replicated tensors are whole."""
    cfg = preset(name)
    declared, local = declare(cfg), device_shapes(cfg, tp)
    assert list(local) == list(declared) == list(param_shapes(cfg))
    for p in placements(cfg, tp, 1, 0):  # no stacking: one placement per contract tensor
        w = declared[p.name]
        if w.tp is None:
            assert p.split is None and local[p.name] == p.shape == w.shape
        else:
            assert p.split == w.tp.axis and p.shape[p.split] % tp == 0
            assert local[p.name] == p.shape[:p.split] + (p.shape[p.split] // tp,) + p.shape[p.split + 1:]


@pytest.mark.parametrize("name", LARGE)
@pytest.mark.parametrize("tp", TPS)
def test_weights_per_device_are_a_tp_share_plus_the_replicated_tensors(name, tp):
    cfg, b = preset(name), 2
    whole = weights_bytes_per_device(cfg, 1, b)
    assert whole == sum(math.prod(s) for s in param_shapes(cfg).values()) * b
    per_device = weights_bytes_per_device(cfg, tp, b)
    kept, extra = _whole_bytes(cfg, b), _extra_head_bytes(cfg, tp, b)
    assert whole / tp <= per_device <= whole / tp + kept + extra
    assert per_device == pytest.approx(whole / tp + kept * (tp - 1) / tp + extra, rel=1e-12)
    assert memory_estimate(cfg, tp=tp)["weights_bytes"] == per_device
    assert memory_estimate(cfg, tp=tp)["model_weights_bytes"] == whole


@pytest.mark.parametrize("name", LARGE)
@pytest.mark.parametrize("cp, tp", [(1, 1), (8, 1), (4, 2), (2, 4), (1, 8), (2, 2), (1, 2)])
def test_kv_and_gdn_state_per_device_follow_the_hand_formula(name, cp, tp):
    cfg, b = preset(name), 2
    kv_heads = cfg.num_kv_heads // tp if cfg.num_kv_heads >= tp else 1
    assert kv_bytes_per_token(cfg, cp, b, tp) == 2 * len(cfg.attention_layers) * kv_heads * cfg.head_dim * b / cp
    key_heads = cfg.linear_num_key_heads // tp if cfg.linear_num_key_heads >= tp else 1
    conv = 2 * key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads // tp * cfg.linear_value_head_dim
    recurrent = cfg.linear_num_value_heads // tp * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    assert gdn_state_bytes(cfg, b, tp) == len(cfg.gdn_layers) * ((cfg.conv_kernel - 1) * conv * b + recurrent)
    report = memory_estimate(cfg, cp=cp, tp=tp)
    assert (report["cp"], report["tp"], report["devices"], report["kv_heads_per_device"]) == (cp, tp, cp * tp, kv_heads)
    assert report["kv_bytes_per_token"] == kv_bytes_per_token(cfg, cp, b, tp)


def test_the_397b_kv_cache_at_tp_8_holds_one_replicated_head():
    cfg = preset("qwen3.5-397b-a17b")  # 2 KV heads of 256, 15 full-attention layers
    assert memory_estimate(cfg, cp=8, tp=1)["kv_bytes_per_token"] == 2 * 15 * 2 * 256 * 2 / 8
    assert memory_estimate(cfg, cp=4, tp=2)["kv_bytes_per_token"] == 2 * 15 * 1 * 256 * 2 / 4
    assert memory_estimate(cfg, cp=1, tp=8)["kv_bytes_per_token"] == 2 * 15 * 1 * 256 * 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tp_1_is_the_cp_only_estimate(name):
    cfg = PRESETS[name]
    for cp in (1, 4):
        plain, explicit = memory_estimate(cfg, cp=cp, budget_bytes=80 << 30), \
            memory_estimate(cfg, cp=cp, budget_bytes=80 << 30, tp=1)
        assert plain == explicit and plain["tp"] == 1 and plain["weights_bytes"] == plain["model_weights_bytes"]


def test_activations_per_token_shrink_with_tp_but_not_below_the_d_wide_buffers():
    cfg = preset("qwen3.5-27b")  # dense: every widest activation is head- or intermediate-split
    per_token = [memory_estimate(cfg, tp=tp)["activation_bytes_per_local_token"] for tp in TPS]
    assert per_token == sorted(per_token, reverse=True) and per_token[-1] < per_token[0]
    assert per_token[-1] > 2 * 4 * cfg.hidden_size * 2


def test_the_397b_fits_eight_h200_only_at_tp_8():
    cfg, h200 = preset("qwen3.5-397b-a17b"), 141 << 30
    fits = {(cp, tp): memory_estimate(cfg, cp=cp, tp=tp, budget_bytes=h200)["max_prompt_tokens"]
            for cp, tp in [(8, 1), (4, 2), (2, 4), (1, 8)]}
    assert fits[(8, 1)] == fits[(4, 2)] == fits[(2, 4)] == 0
    assert fits[(1, 8)] == cfg.max_position_embeddings
    assert "tp=8" in format_memory_report(memory_estimate(cfg, tp=8, budget_bytes=h200))


def test_tp_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="tp=0 must be a positive integer"):
        memory_estimate(PRESETS["demo"], tp=0)


def _comm_volume(monkeypatch):
    benchmarks = pathlib.Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # as when a benchmark runs: benchmarks/ is on sys.path
    spec = importlib.util.spec_from_file_location("comm_volume", benchmarks / "comm_volume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["qwen3.5-122b-a10b", "qwen3.5-397b-a17b"])
def test_the_cp_tp_volumes_reduce_to_the_cp_only_formulas(name, monkeypatch):
    from pcp_jax.parallel.gdn_cp import communication_bytes
    cv, cfg, n = _comm_volume(monkeypatch), preset(name), 131072
    for cp in (2, 4, 8):
        v, ref = cv.prefill_volumes(cfg, n, cp, 1), communication_bytes(cfg, 1, n, cp)
        assert (v["ring_attention"], v["gdn_sequence"], v["tp_allreduce"]) == (
            ref["ring_attention"], ref["gdn_sequence"], 0)
    v = cv.prefill_volumes(cfg, n, 2, 4)  # 2 KV heads over 4 ranks: one replicated head each
    assert v["ring_attention"] == 1 * n // 2 * 2 * 1 * cfg.head_dim * 2
    assert v["tp_allreduce"] == 2 * 2 * 3 / 4 * (n // 2) * cfg.hidden_size * 2


@pytest.mark.parametrize("tp", [3, 64])
def test_an_estimate_refuses_a_tp_that_loading_refuses(tp):
    """tp = 3 does not divide the 9B's heads; tp = 64 would leave 0 GDN value heads per device. Loading
    refuses both before reading a weight (check_tp); the estimate gave figures for them."""
    cfg = preset("qwen3.5-9b")
    with pytest.raises(ValueError) as loading:
        check_tp(cfg, tp)
    with pytest.raises(ValueError, match=f"tp={tp} does not split this model") as estimate:
        memory_estimate(cfg, tp=tp, budget_bytes=80 << 30)
    assert str(estimate.value) == str(loading.value)
    with pytest.raises(ValueError, match=f"tp={tp} does not split"):
        weights_bytes_per_device(cfg, tp, 2)


def test_an_estimate_takes_numpy_integers_as_model_does():
    cfg = preset("qwen3.5-9b")
    got = memory_estimate(cfg, cp=np.int64(2), tp=np.int32(2), budget_bytes=np.int64(80 << 30))
    assert got == memory_estimate(cfg, cp=2, tp=2, budget_bytes=80 << 30)
    assert all(type(got[k]) is int for k in ("cp", "tp", "devices", "budget_bytes"))


@pytest.mark.parametrize("call, message", [
    (lambda: memory_estimate(None), "cfg=None must be a ModelConfig"),
    (lambda: memory_estimate("qwen3.5-9b"), "cfg='qwen3.5-9b' must be a ModelConfig"),
    (lambda: memory_estimate(preset("demo"), dtype=["bfloat16"]), r"dtype=\['bfloat16'\]; expected one of"),
    (lambda: memory_estimate(preset("demo"), cp=2.0), "cp=2.0 must be a positive integer"),
    (lambda: format_memory_report(None), "report=None must be the dict of memory_report or memory_estimate"),
])
def test_wrong_arguments_are_one_line_value_errors(call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value)

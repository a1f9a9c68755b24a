"""Tensor and expert parallelism (`tp`) beside context parallelism (`cp`), fp32 on CPU with 8 devices:
logits and greedy tokens against transformers for every (cp, tp) of the issue on dense and MoE models whose KV
heads and GDN key heads (2) are fewer than T (ragged B = 3, and B = 1; the MoE one with tied embeddings); both
GDN strategies, chunked prefill, decode and the prefix cache at (cp, tp) = (2, 2) against cp = tp = 1; the
weights each device holds; the split rules. Greedy tokens come from transformers' forward pass
(hf_models.hf_greedy)."""

import numpy as np
import pytest

import pcp_jax
from pcp_jax.engine import Model, to_host
from pcp_jax.memory import state_bytes_per_device
from pcp_jax.parallel.tensor import check_tp, local_config, qkv_column_index
from hf_models import build, hf_greedy, hf_logits, rel_err
from tiny import decode_trace, tiny_config, tiny_params

TOL = 1e-5
# 8 query heads, 2 KV heads, 2 GDN key heads, 8 GDN value heads, vocab 104: splittable up to tp = 8,
# with KV and GDN key heads repeated for tp = 4 and 8.
SHAPE = dict(vocab_size=104, num_attention_heads=8, num_key_value_heads=2, linear_num_key_heads=2,
             linear_num_value_heads=8)
MESHES = [(2, 2), (4, 2), (1, 4), (2, 4), (1, 8)]


@pytest.fixture(scope="module", params=["dense", "moe"])
def hf_case(request, tmp_path_factory):
    """A tiny HF model saved to a folder, a ragged batch of 3 prompts and a single prompt, and transformers'
    answers for them (computed once for every mesh)."""
    moe = request.param == "moe"
    # the MoE model also ties its LM head to the vocabulary-split embedding
    extra = dict(shared_expert_intermediate_size=32, tie_word_embeddings=True) if moe else dict(intermediate_size=64)
    hf = build(moe=moe, seed=11 + moe, **SHAPE, **extra)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    rng = np.random.default_rng(14)
    prompts = [rng.integers(0, hf.config.vocab_size, n) for n in (53, 20, 37)]  # B = 3, ragged rows
    one = prompts[0][None, :29]  # B = 1
    return dict(path=str(path), prompts=prompts, one=one, ref_rows=[hf_logits(hf, p[None])[0] for p in prompts],
                ref_one=hf_logits(hf, one)[:, -1], ref_tokens=hf_greedy(hf, one, NEW_TOKENS))


NEW_TOKENS = 6


@pytest.mark.parametrize("cp,tp", MESHES)
def test_logits_and_greedy_match_transformers(hf_case, cp, tp):
    model = pcp_jax.load_model(hf_case["path"], cp=cp, tp=tp, dtype="float32")
    assert (model.cp, model.tp) == (cp, tp)
    got = model.logits(hf_case["prompts"])
    for row, (ids, ref) in enumerate(zip(hf_case["prompts"], hf_case["ref_rows"])):
        assert rel_err(got[row, :len(ids)], ref) <= TOL, (row, len(ids))
    # B = 1: the next-token logits of prefill, then greedy decoding (the same prefill program)
    state = model.prefill(hf_case["one"], max_new_tokens=NEW_TOKENS)
    assert rel_err(to_host(state.logits), hf_case["ref_one"]) <= TOL
    np.testing.assert_array_equal(model.generate(hf_case["one"], NEW_TOKENS), hf_case["ref_tokens"])


@pytest.fixture(scope="module")
def moe_tiny():
    cfg = tiny_config(moe=True, num_heads=8, num_kv_heads=2, linear_num_key_heads=2, linear_num_value_heads=8,
                      vocab_size=72, shared_expert_intermediate_size=32)
    params = tiny_params(cfg, seed=7)
    return cfg, params, Model(cfg, params, dtype="float32")


@pytest.mark.parametrize("strategy", ["batch", "sequence"])
def test_strategies_chunked_decode_under_cp_tp(moe_tiny, strategy):
    cfg, params, reference = moe_tiny
    model = Model(cfg, params, cp=2, tp=2, dtype="float32", gdn_strategy=strategy)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 300))
    assert rel_err(model.logits(ids), reference.logits(ids)) <= TOL
    ref_tok, ref_trace = decode_trace(reference, ids, 6)
    for chunk in (None, 128):  # one shot, then chunked prefill (three pieces) before the decode steps
        tok, trace = decode_trace(model, ids, 6, chunk_size=chunk)
        np.testing.assert_array_equal(tok, ref_tok)
        assert rel_err(trace, ref_trace) <= TOL, chunk


def test_weights_per_device_shrink_with_tp(moe_tiny):
    """Each device holds at most 1/T of the split weights plus the replicated ones (norms, router, shared
    gate) and the repeated KV/GDN-key columns."""
    cfg, params, reference = moe_tiny
    whole = state_bytes_per_device(reference.weights)
    replicated = sum(np.asarray(v).nbytes for k, v in params.items()
                     if k.rsplit(".", 1)[-1] in ("input_norm", "post_norm", "final_norm", "q_norm", "k_norm", "norm",
                                                 "router", "shared_gate"))
    for tp in (2, 4, 8):
        held = state_bytes_per_device(Model(cfg, params, tp=tp, dtype="float32").weights)
        repeated_kv = sum(np.asarray(v).nbytes for k, v in params.items()
                          if k.endswith(("k_proj", "v_proj"))) * max(tp // cfg.num_kv_heads, 1) / tp
        key_columns = 2 * cfg.linear_key_dim / cfg.conv_dim
        repeated_qk = sum(np.asarray(v).nbytes * key_columns for k, v in params.items()
                          if k.endswith(("in_proj_qkv", "conv_weight"))) * max(tp // cfg.linear_num_key_heads, 1) / tp
        assert held <= (whole - replicated) / tp + replicated + repeated_kv + repeated_qk + 1, tp
        assert held < whole / tp * 1.5, tp


def test_split_rules():
    cfg = tiny_config(num_heads=8, num_kv_heads=2, linear_num_key_heads=2, linear_num_value_heads=8,
                      vocab_size=72, intermediate_size=64)
    local = local_config(cfg, 4)
    assert (local.num_heads, local.num_kv_heads, local.linear_num_key_heads, local.linear_num_value_heads,
            local.intermediate_size, local.vocab_size) == (2, 1, 1, 2, 16, 18)
    # rank-major [q_r | k_r | v_r]: rank 3 reads key head 1 (repeated) and value heads 6, 7
    index = qkv_column_index(cfg, 4).reshape(4, -1)
    dk, dv, kd = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_key_dim
    expect = np.concatenate([np.arange(dk, 2 * dk), kd + np.arange(dk, 2 * dk), 2 * kd + np.arange(6 * dv, 8 * dv)])
    np.testing.assert_array_equal(index[3], expect)
    with pytest.raises(ValueError, match="vocab_size=67"):
        check_tp(tiny_config(), 2)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        check_tp(tiny_config(num_heads=6, num_kv_heads=3, linear_num_value_heads=4, vocab_size=72), 2)
    with pytest.raises(ValueError, match="needs 16 devices"):
        Model(cfg, tiny_params(cfg), cp=4, tp=4)


def test_check_tp_takes_numpy_integers_as_make_mesh_does():
    """load_model checks tp with check_tp before it builds the mesh; make_mesh and Model take numpy integers."""
    cfg = tiny_config(num_heads=8, linear_num_value_heads=8, vocab_size=72, intermediate_size=64)
    check_tp(cfg, np.int64(4))
    for bad in (True, 2.0, 0):
        with pytest.raises(ValueError, match=f"tp={bad!r} must be a positive integer"):
            check_tp(cfg, bad)

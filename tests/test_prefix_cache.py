"""A prefix cache that hits: a shared document or an earlier chat turn is reused block by block, without
chunking the prefill (pcp_jax/prefix_cache.py).

For cp 1, 2 and 4, (cp, tp) = (2, 2), both GDN strategies and a ragged batch: a document followed by three
different questions, default settings: turns 2 and 3 reuse every block of the document a boundary allows, and
their next-token logits and greedy tokens equal a cold run (fp32, <= 1e-6 relative) and transformers
(<= 1e-5); the first prefill with the cache on runs the same one-shot program as with it off (plus its
captures). A three-turn chat with `generate` between turns resumes each turn after the previous answer. A
budget that holds one entry evicts and stays exact.
"""

import numpy as np
import pytest

import pcp_jax
from pcp_jax.engine import to_host
from pcp_jax.programs import Prefill
from hf_models import build, hf_generate, hf_logits, rel_err

DOC, BLOCK = 1100, 1024  # a document of one whole default block and a bit


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    hf = build(seed=51, vocab_size=102)
    path = tmp_path_factory.mktemp("prefix") / "model"
    hf.save_pretrained(path)
    return hf, str(path)


def _models(path, cp, tp, strategy, **cache):
    kw = dict(cp=cp, tp=tp, dtype="float32", gdn_strategy=strategy)
    warm, cold = pcp_jax.load_model(path, **kw), pcp_jax.load_model(path, **kw)
    warm.enable_prefix_cache(1 << 30, **cache)
    return warm, cold


def _rows(doc, question, batch):
    """The batch of one turn: the document then the question; a second row shorter by three tokens (ragged)."""
    full = np.concatenate([doc, question])
    return [full] if batch == 1 else [full, full[:-3]]


def _check_against_cold_and_transformers(hf, warm, cold, rows):
    got, want = to_host(warm.prefill(rows).logits), to_host(cold.prefill(rows).logits)
    assert rel_err(got, want) <= 1e-6
    for b, row in enumerate(rows):
        assert rel_err(got[b], hf_logits(hf, row[None])[0, -1]) <= 1e-5, b
    tokens = warm.generate(rows, 3)
    np.testing.assert_array_equal(tokens, cold.generate(rows, 3))
    if len(rows) == 1:
        np.testing.assert_array_equal(tokens, hf_generate(hf, rows[0][None], 3))


@pytest.mark.parametrize("cp,tp,strategy,batch", [
    (1, 1, "auto", 1), (2, 1, "sequence", 1), (2, 1, "batch", 2), pytest.param(4, 1, "auto", 1, marks=pytest.mark.slow),
    pytest.param(2, 2, "auto", 1, marks=pytest.mark.slow)])
def test_a_document_then_three_questions(hf_model, cp, tp, strategy, batch):
    hf, path = hf_model
    warm, cold = _models(path, cp, tp, strategy)
    rng = np.random.default_rng(cp * 10 + tp + batch)
    doc = rng.integers(0, hf.config.vocab_size, DOC)
    for turn in range(3):
        rows = _rows(doc, rng.integers(0, hf.config.vocab_size, 30 + 7 * turn), batch)
        before = warm.prefix_cache_stats()
        _check_against_cold_and_transformers(hf, warm, cold, rows)
        stats = warm.prefix_cache_stats()
        if turn == 0:
            assert before["misses"] == 0 and stats["misses"] >= 1, stats
            # one piece, the program cache-off runs plus its captures: turning the cache on chunks nothing
            one_shot = {s for s in warm.programs.ready_signatures() if isinstance(s, Prefill)}
            plain = {s for s in cold.programs.ready_signatures() if isinstance(s, Prefill)}
            assert {(s.n_pad, s.with_history, s.capture) for s in one_shot if not s.all_logits} \
                >= {(s.n_pad, False, True) for s in plain if not s.all_logits and not s.with_history}
        else:  # the document's whole block is restored for every row, by the prefill and by generate's
            assert stats["tokens_reused"] - before["tokens_reused"] == 2 * BLOCK * batch, (before, stats)


@pytest.mark.parametrize("cp,strategy", [(1, "auto"), pytest.param(2, "batch", marks=pytest.mark.slow)])
def test_a_three_turn_chat_resumes_after_each_answer(hf_model, cp, strategy):
    """Each turn sends the previous turn's prompt, its answer and a new message; the cache resumes at the
    last boundary the answer crossed (block 64: the states are snapshotted during generation)."""
    hf, path = hf_model
    batch = 2 if strategy == "batch" else 1
    warm, cold = _models(path, cp, 1, strategy, block_tokens=64)
    rng = np.random.default_rng(61 + cp)
    rows = [rng.integers(0, hf.config.vocab_size, 100)] * batch
    for turn in range(3):
        before = warm.prefix_cache_stats()
        _check_against_cold_and_transformers(hf, warm, cold, rows)
        if turn:  # resumed at the previous answer's last crossed boundary (prefill and generate's prefill)
            reused = warm.prefix_cache_stats()["tokens_reused"] - before["tokens_reused"]
            assert reused == 2 * batch * ((len(rows[0]) - 20 - 1) // 64 * 64), (turn, before, reused)
        answer = warm.generate(rows, 40)
        np.testing.assert_array_equal(answer, cold.generate(rows, 40))
        rows = [np.concatenate([a, rng.integers(0, hf.config.vocab_size, 20)]) for a in answer]


def test_a_small_budget_evicts_and_stays_exact(hf_model):
    hf, path = hf_model
    warm, cold = _models(path, 2, 1, "auto")
    rng = np.random.default_rng(71)
    docs = [rng.integers(0, hf.config.vocab_size, DOC) for _ in range(3)]
    warm.prefill(_rows(docs[0], docs[0][:20], 1))
    entry = warm.prefix_cache_stats()["bytes_held"]  # what one document's entries hold
    warm.enable_prefix_cache(entry + entry // 2)  # a new cache: one document's entries, not two
    for doc in docs + docs[-1:]:
        rows = _rows(doc, rng.integers(0, hf.config.vocab_size, 25), 1)
        got, want = to_host(warm.prefill(rows).logits), to_host(cold.prefill(rows).logits)
        assert rel_err(got, want) <= 1e-6
        assert warm.prefix_cache_stats()["bytes_held"] <= entry + entry // 2
    stats = warm.prefix_cache_stats()
    assert stats["evictions"] > 0 and stats["hits"] >= 1, stats

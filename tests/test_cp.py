"""Context parallelism is exact: logits for cp in {2, 4, 8} equal cp=1 (fp32, rel. err <= 1e-5), dense
and MoE, B in {1, 2, 3, 8}, lengths 1, 63, exactly 2·C·64 and a few hundred non-aligned tokens, both GDN
strategies wherever valid. Ragged batches put several lengths in one call."""

import numpy as np
import pytest

from pcp_jax.engine import Model
from hf_models import rel_err
from tiny import tiny_config, tiny_params

TOL = 1e-5


def _prompts(batch: int, cp: int, rng, vocab: int):
    lengths = [1, 63, 2 * cp * 64, 301, 200, 64, 5, 129][:batch] if batch > 1 else [2 * cp * 64]
    return [rng.integers(0, vocab, n) for n in lengths]


def _check_rows(got, ref, prompts):
    for b, p in enumerate(prompts):
        n = len(p)
        assert rel_err(got[b, :n], ref[b, :n]) <= TOL, (b, n)


@pytest.fixture(scope="module", params=["dense", "moe"])
def setup(request):
    cfg = tiny_config(moe=request.param == "moe")
    params = tiny_params(cfg, seed=3)
    return cfg, params, Model(cfg, params, cp=1, dtype="float32")


@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_cp_logits_equal_cp1(setup, cp, batch):
    cfg, params, ref_model = setup
    rng = np.random.default_rng(cp * 10 + batch)
    prompts = _prompts(batch, cp, rng, cfg.vocab_size)
    ref = ref_model.logits(prompts)
    strategies = ["sequence"] + (["batch"] if batch % cp == 0 else [])
    for strategy in strategies:
        got = Model(cfg, params, cp=cp, dtype="float32", gdn_strategy=strategy).logits(prompts)
        _check_rows(got, ref, prompts)


def test_single_token_and_short_prompts_under_cp(setup):
    cfg, params, ref_model = setup
    rng = np.random.default_rng(0)
    for n in (1, 63, 301):
        ids = rng.integers(0, cfg.vocab_size, (1, n))
        got = Model(cfg, params, cp=4, dtype="float32").logits(ids)
        assert rel_err(got, ref_model.logits(ids)) <= TOL, n


def test_batch_strategy_rejects_indivisible_batch(setup):
    cfg, params, _ = setup
    model = Model(cfg, params, cp=4, dtype="float32", gdn_strategy="batch")
    with pytest.raises(ValueError, match="multiple of cp"):
        model.logits(np.zeros((3, 10), np.int32))


def test_cp_matches_transformers(tmp_path):
    import pcp_jax
    from hf_models import build, hf_logits
    hf = build(moe=True, seed=11)
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(5).integers(0, hf.config.vocab_size, (2, 333))
    got = pcp_jax.load_model(tmp_path, cp=4, dtype="float32").logits(ids)
    assert rel_err(got, hf_logits(hf, ids)) <= TOL

"""Multi-process runs through jax.distributed on 127.0.0.1 (pcp_jax.launch).

Two processes with two virtual CPU devices each run cp=4 prefill + greedy generation on a tiny random
model and must match the single-process cp=1 model: tokens exactly, logits within 1e-5 relative. Then
each way a job can fail must fail fast, by name: an unreachable coordinator, processes started with
different --num-processes, a cp that the job's devices cannot hold. Every child runs in its own session
and is killed in a `finally`; every wait has a timeout.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import pcp_jax
from pcp_jax.config import ModelConfig
from pcp_jax.launch import free_loopback_port, kill_all, wait_all
from pcp_jax.model import random_params

TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, layer_types=["linear_attention", "full_attention"],
            num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128, linear_num_key_heads=1,
            linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
PROMPTS = [list(np.random.default_rng(0).integers(0, 512, 37)), list(np.random.default_rng(1).integers(0, 512, 20))]
NEW = 6
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "sky"]


def _ids_flag(rows):
    return ";".join(",".join(str(int(t)) for t in r) for r in rows)


def _start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pcp_jax.launch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _finish(procs, timeout):
    """(returncode, stdout, stderr) of each process, all within `timeout` s; kills every session after."""
    deadline = time.monotonic() + timeout
    try:
        outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher processes still running after {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the session holds spawn_local's children too
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def reference():
    """The single-process cp=1 model with the launcher's random weights (seed 0, fp32)."""
    cfg = ModelConfig.from_dict(TINY)
    return pcp_jax.Model(cfg, random_params(cfg, 0, jnp.float32), cp=1, dtype="float32")


def _run(args, timeout):
    t0 = time.monotonic()
    (rc, out, err), = _finish([_start(args)], timeout)
    return rc, out, err, time.monotonic() - t0


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_two_processes_match_single_process(tiny_config, reference, tmp_path):
    save = tmp_path / "run.npz"
    rc, out, err, _ = _run(["--spawn-local", 2, "--spawn-timeout", 150, "--config", tiny_config, "--dtype",
                            "float32", "--cpu-devices-per-process", 2, "--cp", 4, "--ids", _ids_flag(PROMPTS),
                            "--max-new-tokens", NEW, "--save", save, "--init-timeout", 60], timeout=170)
    assert rc == 0, err
    assert "2 process(es), 4 cpu device(s), cp=4, distributed=True" in out
    assert out.count("tokens[0]:") == 1, "only process 0 prints"
    got = np.load(save)
    want_tokens = reference.generate(PROMPTS, NEW)
    np.testing.assert_array_equal(got["tokens"], want_tokens)
    assert _rel_err(got["next_logits"], np.asarray(reference.prefill(PROMPTS).logits)) < 1e-5
    want_logits = reference.logits(PROMPTS)
    for b, n in enumerate(len(p) for p in PROMPTS):
        assert _rel_err(got["logits"][b, :n], want_logits[b, :n]) < 1e-5


def test_prompt_with_tokenizer_single_process(tiny_config, reference, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i + 3 for i, w in enumerate(WORDS)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = "the cat sat on a mat and looked at the sky"
    rc, out, err, _ = _run(["--config", tiny_config, "--tokenizer", tmp_path / "tokenizer.json", "--prompt", text,
                            "--dtype", "float32", "--cpu-devices-per-process", 1, "--max-new-tokens", 4], timeout=90)
    assert rc == 0, err
    assert "1 process(es), 1 cpu device(s), cp=1, distributed=False" in out
    ids = tok.encode(text).ids
    want = reference.generate([ids], 4)[0, len(ids):]
    assert f"tokens[0]: {','.join(map(str, want))}" in out
    assert "text[0]:" in out


def test_unreachable_coordinator_fails_fast():
    port = free_loopback_port()  # nothing listens there
    rc, _, err, seconds = _run(["--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", 1,
                                "--init-timeout", 3, "--preset", "demo", "--ids", "1,2,3"], timeout=60)
    assert rc != 0
    assert f"could not reach the coordinator at 127.0.0.1:{port} within --init-timeout=3 s" in err, err
    assert seconds < 45


@pytest.mark.parametrize("counts", [(2, 3), (3, 2)], ids=["extra-on-1", "extra-on-0"])
def test_mismatched_process_counts_fail_by_name(tiny_config, counts):
    """(2, 3): both join, then compare runs and fail at once. (3, 2): the job never forms; both give up
    after --init-timeout, each saying what it expected."""
    port = free_loopback_port()
    env = dict(os.environ, JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    common = ["--config", tiny_config, "--ids", "1,2,3", "--coordinator", f"127.0.0.1:{port}",
              "--cpu-devices-per-process", 1, "--init-timeout", 5]
    t0 = time.monotonic()
    procs = [_start(common + ["--num-processes", n, "--process-id", i], env=env) for i, n in enumerate(counts)]
    results = _finish(procs, timeout=90)
    seconds = time.monotonic() - t0
    for i, (rc, _, err) in enumerate(results):
        assert rc != 0, f"process {i} exited 0"
        assert "--num-processes" in err and str(counts[i]) in err, err
    if counts == (2, 3):
        assert "--num-processes: process 0 has 2, process 1 has 3" in results[0][2]
    else:
        assert "not all --num-processes=3 processes joined within --init-timeout=5 s" in results[0][2]
        assert "reached the coordinator" in results[1][2] and "(this one: 2)" in results[1][2]
    assert seconds < 60


def test_cp_larger_than_global_devices(tiny_config):
    rc, out, err, seconds = _run(["--spawn-local", 2, "--spawn-timeout", 80, "--config", tiny_config, "--ids",
                                  "1,2,3", "--cpu-devices-per-process", 1, "--cp", 4, "--init-timeout", 30],
                                 timeout=100)
    assert rc != 0
    assert "--cp=4 needs 4 devices but the job has 2 cpu device(s) over 2 process(es)" in err, err
    assert seconds < 80


def test_wait_all_kills_stragglers_after_a_failure():
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]),
             subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])]
    t0 = time.monotonic()
    try:
        assert wait_all(procs, timeout=60, grace=1) == 3
    finally:
        kill_all(procs)
    assert time.monotonic() - t0 < 30
    assert all(p.poll() is not None for p in procs)

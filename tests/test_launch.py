"""Multi-process runs through jax.distributed on 127.0.0.1 (pcp_jax.launch).

Two processes with two virtual CPU devices each run cp=4 prefill + greedy generation on a tiny random
model and must match the single-process cp=1 model: tokens exactly, logits within 1e-5 relative; so must two
processes of one device each at tp=2, each reading its half of the weights from a converted folder. Then
each way a job can fail must fail fast, by name, with one error line per process: an unreachable
coordinator, processes started with different --num-processes (or --save / --warmup), a check that fails
on one process only, a cp that the job's devices cannot hold, a process killed mid-run, and spawning
that could multiply. Every child runs in its own session and is killed in a `finally`; every wait has a
timeout.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import pcp_jax
from pcp_jax.config import ModelConfig
from pcp_jax.launch import SPAWNED_ENV, free_loopback_port, kill_all, wait_all
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


def _run(args, timeout, **kw):
    t0 = time.monotonic()
    (rc, out, err), = _finish([_start(args, **kw)], timeout)
    return rc, out, err, time.monotonic() - t0


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_two_processes_match_single_process(tiny_config, reference, tmp_path):
    save = tmp_path / "run.npz"
    rc, out, err, _ = _run(["--spawn-local", 2, "--spawn-timeout", 150, "--config", tiny_config, "--dtype",
                            "float32", "--cpu-devices-per-process", 2, "--cp", 4, "--ids", _ids_flag(PROMPTS),
                            "--max-new-tokens", NEW, "--save", save, "--init-timeout", 60], timeout=170)
    assert rc == 0, err
    assert "2 process(es), 4 cpu device(s), cp=4, tp=1, distributed=True" in out
    assert out.count("tokens[0]:") == 1, "only process 0 prints"
    got = np.load(save)
    want_tokens = reference.generate(PROMPTS, NEW)
    np.testing.assert_array_equal(got["tokens"], want_tokens)
    assert _rel_err(got["next_logits"], np.asarray(reference.prefill(PROMPTS).logits)) < 1e-5
    want_logits = reference.logits(PROMPTS)
    for b, n in enumerate(len(p) for p in PROMPTS):
        assert _rel_err(got["logits"][b, :n], want_logits[b, :n]) < 1e-5


def test_tp_over_two_processes_from_a_converted_folder(reference, tmp_path):
    # One device per process and tp=2: each process holds, and reads from the folder, half of every split weight.
    from pcp_jax.convert import save_orbax
    cfg = ModelConfig.from_dict(TINY)
    folder = save_orbax(tmp_path / "conv", cfg, random_params(cfg, 0, jnp.float32).items(), "float32")
    save = tmp_path / "run.npz"
    rc, out, err, _ = _run(["--spawn-local", 2, "--spawn-timeout", 150, "--model", folder, "--dtype", "float32",
                            "--cpu-devices-per-process", 1, "--tp", 2, "--ids", _ids_flag(PROMPTS),
                            "--max-new-tokens", NEW, "--save", save, "--init-timeout", 60], timeout=170)
    assert rc == 0, err
    assert "2 process(es), 2 cpu device(s), cp=1, tp=2, distributed=True" in out
    got = np.load(save)
    np.testing.assert_array_equal(got["tokens"], reference.generate(PROMPTS, NEW))
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
    assert "1 process(es), 1 cpu device(s), cp=1, tp=1, distributed=False" in out
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


def _error_lines(err):
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("flag", ["--spawn-loc", "--spawn"])
def test_abbreviated_spawn_local_is_refused(tiny_config, flag):
    """An abbreviation was once accepted by argparse but not stripped from the children's flags, so
    every child spawned again, without end."""
    rc, _, err, seconds = _run([flag, 2, "--cpu-devices-per-process", 1, "--cp", 2, "--config", tiny_config,
                                "--ids", "1,2,3"], timeout=60)
    assert rc == 2 and _error_lines(err) == [f"pcp-jax: error: unrecognized arguments: {flag} 2"], err
    assert seconds < 30


def test_spawned_process_never_spawns(tiny_config):
    """Whatever its flags, a process started by --spawn-local (marked through the environment) refuses
    --spawn-local instead of starting more processes."""
    rc, _, err, _ = _run(["--spawn-local", 2, "--cpu-devices-per-process", 1, "--config", tiny_config,
                          "--ids", "1,2,3"], timeout=60, env=dict(os.environ, **{SPAWNED_ENV: "12345"}))
    assert rc == 2 and len(_error_lines(err)) == 1, err
    assert "a started process never starts more" in err and "12345" in err


def _start_job(tiny_config, per_process, common=()):
    """Start one process per entry of `per_process` (its own extra flags) as a manual job on 127.0.0.1."""
    port = free_loopback_port()
    env = dict(os.environ, JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    base = ["--config", tiny_config, "--ids", "1,2,3", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
            len(per_process), "--cpu-devices-per-process", 1, "--cp", len(per_process), "--init-timeout", 30,
            *common]
    return [_start(base + ["--process-id", i, *extra], env=env) for i, extra in enumerate(per_process)]


def test_save_and_warmup_are_compared_across_processes(tiny_config, tmp_path):
    """--save and --warmup each add collective work; a process started without them used to wait in a
    collective its peer never joined (~70 s, then an abort). Now both stop at once, naming both flags."""
    save = str(tmp_path / "x.npz")
    t0 = time.monotonic()
    results = _finish(_start_job(tiny_config, [["--save", save], ["--warmup"]]), timeout=90)
    for i, (rc, _, err) in enumerate(results):
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"pcp-jax: error (process {i}):"), err
        assert f"--save: process 0 has {save!r}, process 1 has None" in lines[0]
        assert "--warmup: process 0 has False, process 1 has True" in lines[0]
    assert time.monotonic() - t0 < 45


def test_a_check_failing_on_one_process_stops_every_process(tiny_config, tmp_path):
    """Only process 0 writes --save, so only it checks the folder, before the run; its peers learn of
    the refusal through the coordinator and stop with the same reason instead of running alone."""
    save = str(tmp_path / "missing" / "x.npz")
    results = _finish(_start_job(tiny_config, [[], []], common=["--save", save]), timeout=90)
    for i, (rc, _, err) in enumerate(results):
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and "does not exist; create it first" in lines[0], err
    assert "process 0 cannot run: --save=" in results[1][2]


@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator-killed", "peer-killed"])
def test_survivor_of_a_killed_process_exits_with_one_line(tiny_config, tmp_path, victim):
    """A long generation is running when one process (with its whole session) is killed. The survivor
    stops within the heartbeat time with one error line and exit code 1, not XLA's SIGABRT and stack dump
    (which XLA raises at once when the coordinator, process 0, is the one that died)."""
    procs = _start_job(tiny_config, [[], []], common=["--max-new-tokens", 100000, "--no-eos",
                                                      "--heartbeat-timeout", 10])
    survivor = procs[1 - victim]
    try:
        deadline = time.monotonic() + 90
        ready = ""
        while "ready in" not in ready:  # process 0 prints it when the model is built, then generates
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                f"the job did not start: {ready}"
            if select.select([procs[0].stdout], [], [], 1.0)[0]:
                ready += os.read(procs[0].stdout.fileno(), 4096).decode()
        time.sleep(1)
        os.killpg(procs[victim].pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = survivor.communicate(timeout=40)
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    lines = _error_lines(err)
    assert survivor.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"pcp-jax: error (process {1 - victim}): the job stopped"), err
    assert seconds < 25

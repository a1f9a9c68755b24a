"""`pcp-jax generate` as a job of several processes on 127.0.0.1 (pcp_jax.distributed, pcp_jax.cli.supervise).

Two processes with two virtual CPU devices each run cp=4 prefill + greedy generation on a tiny random model:
the tokens must equal the single-process model's, the next-token logits within 1e-5 relative, and each
process must hold one KV cache at its peak (one prefill, then decode; measured in the processes by a
sitecustomize probe over `jax.live_arrays()`). Two processes of one device each run tp=2 from converted
folders at the same relative path on different working directories (same content: it runs). Then each way a
job can fail must fail by name, with one error line per process, bounded in time: an unreachable
coordinator, processes started differently, a model that differs between hosts, a check failing on one
process, a cp the job cannot hold, a coordinator port used by another job or held by another program, a
killed peer, a stopped worker, a killed parent. Every process runs in its own session and dies with the
test; every wait is bounded (tests/jobs.py).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import pcp_jax
from jobs import alive, bindable, children, error_lines, finish, free_port, kill, start, start_job
from pcp_jax.config import ModelConfig
from pcp_jax.weights import random_params

TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, layer_types=["linear_attention", "full_attention"],
            num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128, linear_num_key_heads=1,
            linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
PROMPTS = [list(np.random.default_rng(0).integers(0, 512, 37)), list(np.random.default_rng(1).integers(0, 512, 20))]
NEW = 6
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "sky"]

PROBE = '''
import atexit, json, os
_out = os.environ.get("PCP_TEST_PROBE")
if _out:
    import jax
    from pcp_jax import engine
    _seen = {"prefill": 0, "logits": 0, "decode": 0, "live": {}, "cache": []}

    def _arrays(arrays):
        return [[list(a.shape), str(a.dtype), sum(s.data.nbytes for s in a.addressable_shards)] for a in arrays]

    def _wrap(name):
        original = getattr(engine.Model, name)
        def probed(self, *args, **kwargs):
            _seen[name] += 1
            _seen["live"][name] = _arrays(jax.live_arrays())
            if name == "decode":
                _seen["cache"] = _arrays(jax.tree.leaves(args[0].caches))
            return original(self, *args, **kwargs)
        setattr(engine.Model, name, probed)

    for _name in ("prefill", "logits", "decode"):
        _wrap(_name)
    atexit.register(lambda: _seen["live"] and open(f"{_out}.{os.getpid()}", "w").write(json.dumps(_seen)))
'''


def _ids(rows):
    return ";".join(",".join(str(int(t)) for t in r) for r in rows)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def reference():
    """The single-process cp=1 model with the command's random weights (seed 0, fp32)."""
    cfg = ModelConfig.from_dict(TINY)
    return pcp_jax.Model(cfg, random_params(cfg, 0, jnp.float32), cp=1, dtype="float32")


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_two_processes_hold_one_kv_cache_and_match_one_process(tiny_config, reference, tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    env = dict(os.environ, PCP_TEST_PROBE=str(tmp_path / "seen"),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "probe"), os.environ.get("PYTHONPATH", "")]))
    save = tmp_path / "run.npz"
    results = finish(start_job(["--config", tiny_config, "--dtype", "float32", "--cpu-devices", 2, "--cp", 4,
                                "--ids", _ids(PROMPTS), "--max-new-tokens", NEW, "--save", save], [[], []], env=env),
                     timeout=300)
    for rc, _, err in results:
        assert rc == 0, err
    out, err = results[0][1], results[0][2]
    assert "2 process(es), 4 cpu device(s), cp=4, tp=1]" in err and not results[1][1].strip(), "process 0 prints"
    want = reference.generate(PROMPTS, NEW)
    got = np.load(save)
    np.testing.assert_array_equal(got["tokens"], want)
    assert got["lengths"].tolist() == [len(p) for p in PROMPTS]
    assert out.splitlines() == [f"[{b}] {','.join(map(str, want[b, len(p):len(p) + NEW]))}" for b, p in
                                enumerate(PROMPTS)]
    assert _rel_err(got["next_logits"], np.asarray(reference.prefill(PROMPTS).logits)) < 1e-5
    seen = [json.loads((tmp_path / name).read_text()) for name in os.listdir(tmp_path) if name.startswith("seen.")]
    assert len(seen) == 2, "one probe record per worker"
    for s in seen:
        assert (s["prefill"], s["logits"], s["decode"]) == (1, 0, 1), s  # one prefill, no other pass
        # Device arrays shaped like a KV cache's (stacked K/V, GDN conv and recurrent states), this process's
        # shards: none alive when the prefill starts, and when decode starts exactly the cache it decodes from.
        kinds = {(tuple(shape), dtype) for shape, dtype, _ in s["cache"]}
        cache_like = lambda live: sum(n for shape, dtype, n in live if (tuple(shape), dtype) in kinds)
        one_cache = sum(n for _, _, n in s["cache"])
        assert one_cache > 0 and cache_like(s["live"]["prefill"]) == 0, s
        assert cache_like(s["live"]["decode"]) == one_cache, s


def test_tp_over_two_processes_from_converted_folders_at_one_relative_path(reference, tmp_path):
    """tp=2 with one device per process: each process reads half of every split weight from `model`, a
    relative path that names a different folder on each (their own working directories) holding the same
    model: paths are not compared, what they hold is."""
    from pcp_jax.convert import save_orbax
    cfg = ModelConfig.from_dict(TINY)
    for host in ("host0", "host1"):
        (tmp_path / host).mkdir()
        save_orbax(tmp_path / host / "model", cfg, random_params(cfg, 0, jnp.float32).items(), "float32")
    save = tmp_path / "run.npz"
    port = free_port()
    procs = [start(["--model", "model", "--dtype", "float32", "--cpu-devices", 1, "--tp", 2, "--ids", _ids(PROMPTS),
                    "--max-new-tokens", NEW, "--save", save, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                    "--process-id", i], cwd=tmp_path / f"host{i}") for i in range(2)]
    for rc, _, err in finish(procs, timeout=300):
        assert rc == 0, err
    np.testing.assert_array_equal(np.load(save)["tokens"], reference.generate(PROMPTS, NEW))


def test_batch_of_text_prompts_in_one_process(tiny_config, reference, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i + 3 for i, w in enumerate(WORDS)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    texts = ["the cat sat on a mat and looked at the sky", "a cat looked at the mat"]
    (rc, out, err), = finish([start(["--config", tiny_config, "--tokenizer", tmp_path / "tokenizer.json", "--prompt",
                                     texts[0], "--prompt", texts[1], "--dtype", "float32", "--max-new-tokens", 4])],
                             timeout=200)
    assert rc == 0, err
    assert "1 process(es)" in err and "cp=1, tp=1]" in err
    rows = [tok.encode(t).ids for t in texts]
    want = reference.generate(rows, 4)
    assert out.splitlines() == [f"[{b}] {tok.decode(want[b, len(r):len(r) + 4].tolist())}" for b, r in enumerate(rows)]


def test_unreachable_coordinator_fails_by_name():
    port = free_port()  # nothing listens there
    (rc, _, err), = finish([start(["--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", 1,
                                   "--init-timeout", 3, "--preset", "demo", "--ids", "1,2,3"])], timeout=90)
    assert rc == 1 and len(error_lines(err)) == 1, err
    assert (f"pcp-jax: error (process 1): process 1 of 2 could not reach the coordinator at 127.0.0.1:{port} within "
            f"--init-timeout=3 s") in err


@pytest.mark.parametrize("extras,difference", [
    ([["--num-processes", 2], ["--num-processes", 3]], "--num-processes: process 0 has 2, process 1 has 3"),
    ([["--num-processes", 3], ["--num-processes", 2]], "--num-processes: process 0 has 3, process 1 has 2"),
    ([[], ["--warmup", 8]], "--warmup: process 0 has None, process 1 has 8"),
], ids=["extra-on-1", "extra-on-0", "warmup-on-1"])
def test_processes_started_differently_stop_at_once_by_name(tiny_config, extras, difference):
    """Before JAX starts, each process's run is compared with process 0's: a difference stops every process
    of the job at once (a job that never formed used to wait --init-timeout), naming the flag."""
    port = free_port()
    base = ["--config", tiny_config, "--ids", "1,2,3", "--cpu-devices", 1, "--init-timeout", 120,
            "--coordinator", f"127.0.0.1:{port}"]
    procs = [start([*base, "--process-id", i, *(["--num-processes", 2] if "--num-processes" not in e else []), *e])
             for i, e in enumerate(extras)]
    for i, (rc, _, err) in enumerate(finish(procs, timeout=90)):  # well within --init-timeout
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"pcp-jax: error (process {i}): "), err
        assert difference in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["converted", "hf"])
def test_different_models_at_one_relative_path_are_refused(tmp_path, kind):
    """Two hosts whose `model` folders hold different weights of one shape (two revisions): both processes
    used to run (only the path string was compared), with tokens of neither model. Now the identity of each
    folder (converted: the digest stored at conversion; HF: a sampled sha256) is compared first."""
    for i in range(2):
        folder = tmp_path / f"host{i}" / "model"
        if kind == "hf":
            from hf_models import build
            build(seed=i).save_pretrained(folder)
        else:
            from pcp_jax.convert import save_orbax
            cfg = ModelConfig.from_dict(TINY)
            folder.parent.mkdir()
            save_orbax(folder, cfg, random_params(cfg, i, jnp.float32).items(), "float32")
    port = free_port()
    procs = [start(["--model", "model", "--ids", "1,2,3", "--cpu-devices", 1, "--coordinator", f"127.0.0.1:{port}",
                    "--num-processes", 2, "--process-id", i], cwd=tmp_path / f"host{i}") for i in range(2)]
    marker = "digest stored at conversion" if kind == "converted" else "(sampled)"
    for i, (rc, _, err) in enumerate(finish(procs, timeout=120)):
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and "--model/--preset/--config: process 0 has 'config " in lines[0], err
        assert lines[0].count(marker) == 2, lines[0]


def test_a_check_failing_on_one_process_stops_every_process(tiny_config, tmp_path):
    """Only process 0 writes --save, so only it checks the folder, before the run; its peer learns of the
    refusal from process 0 and stops with the same reason instead of running alone."""
    save = str(tmp_path / "missing" / "x.npz")
    results = finish(start_job(["--config", tiny_config, "--ids", "1,2,3", "--cpu-devices", 1, "--save", save],
                               [[], []]), timeout=90)
    for rc, _, err in results:
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and "does not exist; create it first" in lines[0], err
    assert "pcp-jax: error (process 1): process 0 cannot run: --save=" in results[1][2]


def test_cp_larger_than_the_job_is_refused(tiny_config):
    results = finish(start_job(["--config", tiny_config, "--ids", "1,2,3", "--cpu-devices", 1, "--cp", 4],
                               [[], []]), timeout=150)
    for i, (rc, _, err) in enumerate(results):
        assert rc == 2 and len(error_lines(err)) == 1, err
        assert f"(process {i}): --cp=4 needs 4 devices but the job has 2 cpu device(s) over 2 process(es)" in err


def test_a_job_found_by_jax_compares_runs_too(tiny_config):
    """--cluster-detection (here SLURM's variables, set by hand) lets JAX find the job; the runs are then
    compared by an all-gather right after joining, before any other device work."""
    port = free_port()
    env = dict(os.environ, SLURM_JOB_ID="7", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
               JAX_COORDINATOR_PORT=str(port), JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    procs = [start(["--config", tiny_config, "--ids", "1,2,3", "--cpu-devices", 1, "--cluster-detection", "slurm",
                    "--seed", 3 * i], env=dict(env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))) for i in range(2)]
    for i, (rc, _, err) in enumerate(finish(procs, timeout=150)):
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"pcp-jax: error (process {i}): "), err
        assert "--seed: process 0 has 0, process 1 has 3" in lines[0]


def _long_job(tiny_config, port=None):
    """A 2-process job generating without end; returns its processes once they have joined JAX's
    coordination service (process 0 holds the door's port + 1 for two checks in a row) and had 3 s more."""
    port = free_port() if port is None else port
    procs = start_job(["--config", tiny_config, "--ids", "1,2,3", "--cpu-devices", 1, "--max-new-tokens", 100000,
                       "--no-eos", "--dtype", "float32"], [[], []], port=port)
    deadline, held = time.monotonic() + 150, 0
    while held < 2:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            kill(procs)
            pytest.fail("the job did not start: " + " | ".join(p.stderr.read() for p in procs))
        held = 0 if bindable(port + 1) else held + 1
        time.sleep(0.5)
    time.sleep(3)
    return procs


def test_a_second_job_on_a_busy_port_fails_and_leaves_the_first_running(tiny_config):
    """Another job on a running job's --coordinator port used to end the running job ("different
    incarnation") and run in its place. Now both of its processes stop at once, by name, and never reach
    the running job's coordination service."""
    port = free_port()
    first = _long_job(tiny_config, port)
    try:
        second = start_job(["--config", tiny_config, "--ids", "1,2,3", "--cpu-devices", 1, "--init-timeout", 300],
                           [[], []], port=port)
        results = finish(second, timeout=120)  # well within its --init-timeout
        for rc, _, err in results:
            assert rc == 1 and len(error_lines(err)) == 1 and f"port {port} is in use by another job" in err, err
        assert "has already formed" in results[1][2]
        time.sleep(2)
        assert all(p.poll() is None for p in first), "the running job was disturbed"
    finally:
        kill(first)
    assert not any(line.startswith("pcp-jax: error") for p in first for line in p.stderr.read().splitlines())


@pytest.mark.parametrize("held", [0, 1], ids=["port", "port+1"])
def test_a_port_held_by_another_program_stops_the_job_by_name(tiny_config, held):
    """A program listening on the coordinator's port used to crash process 0 (SIGSEGV) while its peers
    waited their whole --init-timeout. Now every process stops at once with one line, exit 1."""
    port = free_port()
    with socket.create_server(("127.0.0.1", port + held)):
        results = finish(start_job(["--config", tiny_config, "--ids", "1,2,3", "--cpu-devices", 1, "--init-timeout",
                                    300], [[], []], port=port), timeout=120)
    for rc, _, err in results:
        assert rc == 1 and len(error_lines(err)) == 1 and f"port {port + held} " in err, err
        assert "is held by another program" in err


@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator-worker-killed", "peer-worker-killed"])
def test_survivor_of_a_killed_peer_reports_the_job_stopped(tiny_config, victim):
    """One process's worker is killed mid-generation: the survivor stops at once (its connection to the
    door closed; not after the 100 s heartbeat) with "the job stopped", one line, exit 1; the victim's
    supervisor names the signal."""
    procs = _long_job(tiny_config)
    try:
        os.kill(children(procs[victim].pid)[0], signal.SIGKILL)
        results = finish(procs, timeout=60)
    finally:
        kill(procs)
    rc, _, err = results[1 - victim]
    assert rc == 1 and len(error_lines(err)) == 1, err
    assert error_lines(err)[0].startswith(f"pcp-jax: error (process {1 - victim}): the job stopped"), err
    rc, _, err = results[victim]
    assert rc == 128 + signal.SIGKILL and error_lines(err) == [
        f"pcp-jax: error (process {victim}): the worker process of this job was killed by SIGKILL"], err


def test_no_worker_outlives_its_parent_even_when_stopped(tiny_config, tmp_path):
    """A stopped (SIGSTOP) worker whose supervisor is killed, and every process of a job whose starter is
    killed, used to stay behind (a stopped worker cannot run the thread that watched its parent). Now the
    kernel ends them, and the surviving peer reports that the job stopped."""
    procs = _long_job(tiny_config)
    try:
        worker = children(procs[1].pid)[0]
        os.kill(worker, signal.SIGSTOP)
        os.kill(procs[1].pid, signal.SIGKILL)
        (rc, _, err), = finish([procs[0]], timeout=60)
        assert rc == 1 and "the job stopped: process 1 went away" in err, err
        deadline = time.monotonic() + 20
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(worker), "the stopped worker outlived its supervisor"
    finally:
        kill(procs)
    starter = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from jobs import start_job
procs = start_job(["--config", {str(tiny_config)!r}, "--ids", "1,2,3", "--cpu-devices", "1", "--max-new-tokens",
                   "100000", "--no-eos"], [[], []])
print(" ".join(str(p.pid) for p in procs), flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        supervisors = [int(pid) for pid in starter.stdout.readline().split()]
        deadline = time.monotonic() + 150
        while len([w for s in supervisors for w in children(s)]) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        family = supervisors + [w for s in supervisors for w in children(s)]
        starter.kill()
        deadline = time.monotonic() + 20
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in family), "processes of the job outlived the process that started them"
    finally:
        kill([starter])

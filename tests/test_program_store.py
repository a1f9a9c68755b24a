"""Ready in seconds: programs described once, kept on disk, loaded without tracing or compiling.

- A second process's `warmup(N)` loads every program from the store: no trace, no compile (counted with
  `jax.monitoring` events), in at most a quarter of the first process's time; then 15 random lengths <= N
  (logits and a few generated tokens each) compile nothing and their logits equal the exact-length path
  (fp32, <= 1e-6, norm-relative). cp = 1 and 4.
- An entry that is truncated, corrupted, written for another program or version, or a store folder that others
  can write, is never loaded: one warning, the program is compiled again (and rewritten), results identical.
- A compile cache on a file system that cannot be written is refused with one warning up front.
- During background refinement requests compile nothing on the calling thread, and give the results they give
  after refinement.
- The plans of every length up to N, enumerated from the ladder, are those of walking every length.
"""

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from pcp_jax import compile_cache, program_store
from pcp_jax.buckets import all_plans, alternatives, coarse_pieces, ladder, plan_pieces
from pcp_jax.engine import Model, to_host
from hf_models import rel_err
from tiny import tiny_config, tiny_params

TRACE, COMPILE = "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SESSION = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, "tests")
    import jax, numpy as np
    events = []
    jax.monitoring.register_event_duration_secs_listener(lambda event, secs, **_: events.append(event))
    from pcp_jax.engine import Model
    from tiny import tiny_config, tiny_params
    cp, N, folder, check = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "check"
    cfg = tiny_config()
    params = tiny_params(cfg, seed=31)
    model = Model(cfg, params, cp=cp, dtype="float32", compile_cache_dir=folder)
    count = lambda since, name: events[since:].count(name)
    n0, t0 = len(events), time.perf_counter()
    stats = model.warmup(N, max_new_tokens=3, progress=False)
    warm = dict(stats, seconds=time.perf_counter() - t0, traces=count(n0, "{trace}"), compiles=count(n0, "{compile}"))
    rng = np.random.default_rng(32)
    prompts = [rng.integers(0, cfg.vocab_size, (1, int(n))) for n in rng.choice(np.arange(1, N + 1), 15, replace=False)]
    n1 = len(events)
    got = [(model.logits(ids), model.generate(ids, 3)) for ids in prompts]
    session = dict(traces=count(n1, "{trace}"), compiles=count(n1, "{compile}"))
    err = None
    if check:  # the exact-length path: one program per length, compiled here
        exact = Model(cfg, params, cp=cp, dtype="float32", bucket_steps=None, compile_cache_dir="off")
        err = max(float(np.linalg.norm(l - e) / np.linalg.norm(e)) for ids, (l, _) in zip(prompts, got)
                  for e in [exact.logits(ids)])
    print(json.dumps(dict(warm=warm, session=session, err=err)))
""").replace("{trace}", TRACE).replace("{compile}", COMPILE)


def _session(cp, n, folder, check):
    run = subprocess.run([sys.executable, "-c", SESSION, str(cp), str(n), folder, "check" if check else "-"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("cp,n", [(1, 400), (4, 1100)])
def test_a_restart_loads_every_program_and_compiles_nothing(tmp_path, cp, n):
    folder = str(tmp_path / "cache")
    first, second = _session(cp, n, folder, check=False), _session(cp, n, folder, check=True)
    assert first["warm"]["compiled"] == first["warm"]["programs"] > 0 and first["warm"]["compiles"] > 0, first
    assert second["warm"]["loaded"] == second["warm"]["programs"] and second["warm"]["compiled"] == 0, second
    assert second["warm"]["traces"] == 0 and second["warm"]["compiles"] == 0, second
    assert second["warm"]["seconds"] <= first["warm"]["seconds"] / 4, (first["warm"], second["warm"])
    for run in (first, second):
        assert run["session"] == {"traces": 0, "compiles": 0}, run
    assert second["err"] <= 1e-6, second  # the programs loaded compute what the exact-length ones do


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, tiny_params(cfg, seed=33)


def _warm(cfg, params, folder, **kw):
    model = Model(cfg, params, cp=2, dtype="float32", compile_cache_dir=folder, **kw)
    model.warmup(300, max_new_tokens=2, logits=False, progress=False)
    return model


def _entries(folder):
    store = os.path.join(folder, "executables")
    return sorted((os.path.join(store, f) for f in os.listdir(store) if f.endswith(".exe")), key=os.path.getsize)


def _result(model):
    ids = np.random.default_rng(34).integers(0, model.cfg.vocab_size, (1, 200))
    return to_host(model.prefill(ids, max_new_tokens=2).logits), model.generate(ids, 2)


def _same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a[1], b[1])


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """A warmed store, and the results of its model."""
    cfg, params = tiny
    folder = str(tmp_path_factory.mktemp("store") / "cache")
    model = _warm(cfg, params, folder)
    status = model.compile_status()
    assert status["stored"] == status["compiled"] > 0 and status["loaded"] == 0, status
    return folder, _result(model), status["compiled"]


def _copy_store(folder, tmp_path):
    import shutil
    copy = str(tmp_path / "cache")
    shutil.copytree(folder, copy)
    return copy


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def _other_key(path):
    """Write over `path` the entry of another program (its header and checksum are valid)."""
    others = [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".exe") and p != os.path.basename(path)]
    with open(os.path.join(os.path.dirname(path), others[0]), "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _other_key], ids=["truncated", "corrupted", "other-key"])
def test_an_untrusted_entry_is_ignored_with_one_warning_and_rebuilt(tiny, reference, tmp_path, caplog, damage):
    cfg, params = tiny
    folder, want, total = reference
    folder = _copy_store(folder, tmp_path)
    victim = _entries(folder)[-1]  # the largest: a prefill program
    damage(victim)
    with caplog.at_level(logging.WARNING, logger="pcp_jax.program_store"):
        model = _warm(cfg, params, folder)
    warnings = [r for r in caplog.records if r.name == "pcp_jax.program_store"]
    assert len(warnings) == 1 and "ignored a stored program" in warnings[0].getMessage(), warnings
    status = model.compile_status()
    assert (status["compiled"], status["loaded"]) == (1, total - 1), status
    _same(_result(model), want)
    again = _warm(cfg, params, folder)  # rewritten by the compile: loaded by the next process
    assert again.compile_status()["loaded"] == total and again.compile_status()["compiled"] == 0


def test_entries_of_another_version_are_never_loaded(tiny, reference, tmp_path, monkeypatch):
    cfg, params = tiny
    folder, want, total = reference
    folder = _copy_store(folder, tmp_path)
    monkeypatch.setattr(program_store, "environment", lambda: "another jax, jaxlib and pcp_jax")
    model = _warm(cfg, params, folder)
    assert model.compile_status()["loaded"] == 0 and model.compile_status()["compiled"] == total
    _same(_result(model), want)


def test_a_store_others_can_write_is_refused_with_one_warning(tiny, reference, tmp_path, caplog):
    cfg, params = tiny
    folder, want, total = reference
    folder = _copy_store(folder, tmp_path)
    store = os.path.join(folder, "executables")
    os.chmod(store, os.stat(store).st_mode | stat.S_IWGRP | stat.S_IWOTH)
    with caplog.at_level(logging.WARNING, logger="pcp_jax.program_store"):
        model = _warm(cfg, params, folder)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pcp_jax.program_store"]
    assert len(warnings) == 1 and "can be written by other users" in warnings[0], warnings
    assert model.compile_status() == dict(compiled=total, loaded=0, pending=0, failed=0, stored=0, store=None)
    _same(_result(model), want)


def test_a_compile_cache_that_cannot_be_written_is_refused_up_front(caplog):
    with caplog.at_level(logging.WARNING, logger="pcp_jax.compile_cache"):
        assert compile_cache.folder("/proc/self") is None  # a folder no one can create files in, root included
        assert compile_cache.folder("/proc/self") is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "pcp_jax.compile_cache"]
    assert len(warnings) == 1 and "/proc/self cannot be written" in warnings[0], warnings
    full = textwrap.dedent("""
        import resource, signal, sys, logging
        logging.basicConfig()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # files cannot grow: a full disk
        from pcp_jax import compile_cache
        print(compile_cache.folder(sys.argv[1]))
    """)
    with pytest.raises(ValueError, match="exists and is not a folder"):
        compile_cache.folder(__file__)
    run = subprocess.run([sys.executable, "-c", full, os.path.join(ROOT, ".pytest_cache", "full-disk-probe")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "None", (run.stdout, run.stderr)
    assert run.stderr.count("cannot be written (File too large)") == 1, run.stderr


def test_background_refinement_never_compiles_on_the_calling_thread(tiny):
    cfg, params = tiny
    main, on_main = threading.get_ident(), []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: on_main.append(event) if event == COMPILE and threading.get_ident() == main else None)
    model = Model(cfg, params, cp=2, dtype="float32", compile_cache_dir="off")
    stats = model.warmup(1300, max_new_tokens=2, progress=False, background=True)
    assert stats["pending"] > 0, stats  # the fine ladder is still being compiled
    rng = np.random.default_rng(35)
    prompts = [rng.integers(0, cfg.vocab_size, (1, n)) for n in (1300, 1025, 700, 513, 300, 7)]
    during, pending_seen = [], 0
    for ids in prompts:
        pending_seen += model.compile_status()["pending"] > 0
        during.append((model.logits(ids), model.generate(ids, 2)))
    assert pending_seen >= 1 and on_main == [], (pending_seen, on_main)
    deadline = time.monotonic() + 600
    while model.compile_status()["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert model.compile_status()["pending"] == 0 and model.compile_status()["failed"] == 0
    for ids, (logits, tokens) in zip(prompts, during):  # other padding: equal up to fp32 rounding
        assert rel_err(model.logits(ids), logits) <= 1e-6, ids.shape
        np.testing.assert_array_equal(model.generate(ids, 2), tokens)
    assert on_main == []


@pytest.mark.parametrize("cp,chunk_size,auto,fixed,steps", [
    (1, "auto", 4096, False, 8), (2, "auto", 3072, False, 8), (1, "auto", 1024, True, 8), (2, None, 0, False, 8),
    (1, 300, 0, False, 8), (1, "auto", 2048, False, None), (2, "auto", 7168, False, 4)])
def test_plans_enumerated_from_the_ladder_are_those_of_every_length(cp, chunk_size, auto, fixed, steps):
    top = 9000
    for coarse in (False,) if fixed else (False, True):  # fixed plans (prefix cache) have no coarse ladder
        if coarse:
            plan = lambda n: coarse_pieces(n, cp, chunk_size, auto, steps)
        else:
            plan = lambda n: plan_pieces(n, cp, chunk_size, auto, fixed=fixed, steps=steps)
        walked = {(p.count, p.n_pad) for p in map(plan, range(1, top + 1))}
        assert all_plans(top, cp, chunk_size, auto, fixed=fixed, steps=steps, coarse=coarse and not fixed) == walked


def test_coarse_plans_and_alternatives_fit_every_length():
    cp, auto = 2, 6144
    unit = 2 * cp * 64
    coarse = set(ladder(1 << 20, unit, 1))
    for n in range(1, 20000, 37):
        c = coarse_pieces(n, cp, "auto", auto)
        assert c.n_pad in coarse and c.n_pad <= auto and c.count * c.tokens >= n, (n, c)
        options = alternatives(n, cp, "auto", auto)
        fine = plan_pieces(n, cp, "auto", auto)
        cost = lambda p: (p.count * p.n_pad, p.count)
        assert cost(options[0]) <= cost(fine) and all(p.n_pad <= auto for p in options)
        assert all((p.count * p.tokens >= n) and (p.count == 1 or p.tokens == p.n_pad) for p in options), n

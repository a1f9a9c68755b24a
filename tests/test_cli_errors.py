"""Every CLI command fails the same way: one line on stderr (`pcp-jax: error: ...`) naming the value, exit
code 2 for a rejected command line and 1 for a failed run, a traceback only with --debug, and no flag
abbreviations anywhere.

Commands run in-process through `pcp_jax.cli.main` (cheap: each case fails before any device work);
three run as real processes, where the process boundary is the point (`python -m` and the console script
run a second copy of the modules, whose error classes must still be recognised).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pcp_jax
from pcp_jax import cli

TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, layer_types=["linear_attention", "full_attention"],
            num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128, linear_num_key_heads=1,
            linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases name: a tiny --config, a JSON list, a corrupt tokenizer in a model folder, a file."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "list.json").write_text(json.dumps([TINY]))
    (root / "model").mkdir()
    (root / "model" / "tokenizer.json").write_text("{ this is not json")
    (root / "a_file").write_text("x")
    (root / "empty").mkdir()
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("[1, 2]")
    (root / "bad_eos").mkdir()  # an eos outside the vocabulary used to load; generate then blamed the command line
    (root / "bad_eos" / "config.json").write_text(json.dumps(dict(
        model_type="qwen3_5_text", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, intermediate_size=128, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, eos_token_id=600)))
    (root / "not_empty").mkdir()
    (root / "not_empty" / "keep.txt").write_text("mine")
    return root


def _cases(f):
    """(argv, exit code, text the error line must contain), for every command."""
    tiny, src = str(f / "tiny.json"), ["--config", str(f / "tiny.json"), "--ids", "1,2,3"]
    job = ["--coordinator", "127.0.0.1:29500", "--num-processes", "2"]
    gen = ["generate", "--model", str(f / "empty"), "--ids", "1,2"]
    return [
        ([], 2, "required: COMMAND"),
        (["--debg", "demo"], 2, "unrecognized arguments: --debg"),
        # convert
        (["convert"], 2, "required: HF_DIR, OUT_DIR"),
        (["convert", str(f / "missing"), str(f / "out")], 2, "HF_DIR="),
        (["convert", str(f / "a_file"), str(f / "out")], 2, "is a file; expected a folder"),
        (["convert", str(f / "empty"), str(f / "out"), "--dtype", "int8"], 2, "argument --dtype: invalid choice"),
        (["convert", str(f / "hf"), str(f / "out2"), "--no-progres"], 2, "unrecognized arguments: --no-progres"),
        (["convert", str(f / "hf"), str(f / "out3"), "--no-progress"], 1, "config.json"),
        # OUT_DIR is checked before HF_DIR is read: a bad destination is a bad command line (it used to exit 1)
        (["convert", str(f / "hf"), str(f / "not_empty")], 2, "exists and is not empty"),
        (["convert", str(f / "hf"), str(f / "a_file")], 2, "exists and is not a directory"),
        (["convert", str(f / "hf"), str(f / "missing" / "out")], 2, "is not an existing folder; create it first"),
        (["convert", str(f / "bad_eos"), str(f / "out5")], 1, "eos_token_id=600 is outside the vocabulary"),
        # generate
        (["generate", "--ids", "1"], 2, "give exactly one of --model PATH, --preset NAME or --config JSON"),
        (["generate", "--model", str(f / "missing"), "--ids", "1"], 2, "--model="),
        (gen[:3] + ["--ids", "1,x"], 2, "argument --ids: expected comma-separated integers, got '1,x'"),
        (gen + ["--prompt", "hi"], 2, "exactly one of --prompt"),
        (gen + ["--cpu-devices", "-1"], 2, "argument --cpu-devices: expected an integer >= 1, got -1"),
        (gen + ["--top-k", "2.5"], 2, "argument --top-k: expected an integer >= 1, got '2.5'"),
        (gen + ["--seed", str(2**70)], 2, "argument --seed: expected an integer in [0, 2**32)"),
        (gen + ["--temperature", "nan"], 2, "argument --temperature: expected a number >= 0, got 'nan'"),
        (gen + ["--top-p", "0"], 2, "argument --top-p"),
        (gen + ["--max-new-tok", "3"], 2, "unrecognized arguments: --max-new-tok"),
        (gen + ["--compile-cache", str(f / "a_file")], 2, "--compile-cache="),
        (gen + ["--cp", "64"], 2, "--cp=64 needs 64 devices"),
        (["generate", "--model", str(f / "model"), "--prompt", "hi"], 1, "cannot read the tokenizer"),
        (gen, 1, "config.json"),  # a folder without a model: the flag was fine, loading failed
        (["generate", "--model", str(f / "bad_eos"), "--ids", "1,2"], 1,
         "eos_token_id=600 is outside the vocabulary: every id must be in [0, vocab_size=512)"),
        (gen + ["--chunk-size", "0"], 2, "argument --chunk-size: expected an integer >= 1, got 0"),
        (gen + ["--warmup", "-3"], 2, "argument --warmup: expected an integer >= 1, got -3"),
        # warmup
        (["warmup", "--model", str(f / "empty")], 2, "required: --max-tokens"),
        (["warmup", "--model", str(f / "missing"), "--max-tokens", "9"], 2, "--model="),
        (["warmup", "--model", str(f / "empty"), "--max-tokens", "0"], 2, "argument --max-tokens: expected an integer >= 1, got 0"),
        (["warmup", "--model", str(f / "empty"), "--max-tokens", "9", "--batch-sizes", "1,0"], 2,
         "argument --batch-sizes: expected integers >= 1, got 0"),
        (["warmup", "--model", str(f / "empty"), "--max-tokens", "9", "--max-new", "3"], 2, "unrecognized arguments: --max-new"),
        (["warmup", "--model", str(f / "empty"), "--max-tokens", "9", "--compile-cache", str(f / "a_file")], 2,
         "--compile-cache="),
        (["warmup", "--model", str(f / "empty"), "--max-tokens", "9"], 1, "config.json"),
        # demo
        (["demo", "--tokens", "0"], 2, "argument --tokens: expected an integer >= 1, got 0"),
        (["demo", "--tokens", "-5"], 2, "argument --tokens: expected an integer >= 1, got -5"),
        (["demo", "--new-tokens", "-1"], 2, "argument --new-tokens: expected an integer >= 0, got -1"),
        (["demo", "--cp", "0"], 2, "argument --cp: expected an integer >= 1, got 0"),
        (["demo", "--cp", "-2"], 2, "argument --cp: expected an integer >= 1, got -2"),
        (["demo", "--cp", "64"], 2, "--cp=64 needs 64 devices"),
        # bench
        (["bench", "--preset", "nope"], 2, "unknown preset 'nope'"),
        (["bench", "--tokens", "abc"], 2, "argument --tokens: expected comma-separated integers, got 'abc'"),
        (["bench", "--tokens", "256,0"], 2, "argument --tokens: expected integers >= 1, got 0"),
        (["bench", "--layers", "-4"], 2, "argument --layers: expected an integer >= 1, got -4"),
        (["bench", "--preset", "demo", "--layers", "99"], 2, "--layers=99 exceeds"),
        (["bench", "--reps", "0"], 2, "argument --reps: expected an integer >= 1, got 0"),
        (["bench", "--rep", "2"], 2, "unrecognized arguments: --rep"),
        (["bench", "--preset", "demo", "--compile-cache", str(f / "a_file")], 2, "--compile-cache="),
        # generate with random weights, batches and job flags (one process; every case fails before device work)
        (["generate", "--config", str(f / "list.json"), "--ids", "1"], 2, "holds a JSON list; expected an object"),
        (["generate", "--config", str(f / "missing.json"), "--ids", "1"], 2, "cannot be read"),
        (["generate", "--preset", "nope", "--ids", "1"], 2, "unknown preset 'nope'"),
        (["generate", "--preset", "demo", "--config", tiny, "--ids", "1"], 2, "exactly one of --model"),
        (["generate", "--ids", "1,2;"] + src[:2], 2, "argument --ids: expected comma-separated integers, prompts "
         "separated by ';' (none empty), got '1,2;'"),
        (["generate", "--seed", str(2**70)] + src, 2, "argument --seed"),
        (["generate", "--save", str(f / "missing" / "x.npz")] + src, 2, "does not exist; create it first"),
        (["generate", "--save", str(f)] + src, 2, "is a folder; expected a file name"),
        (["generate", "--config", tiny, "--tokenizer", str(f / "model" / "tokenizer.json"), "--prompt", "hi"], 1,
         "cannot read the tokenizer"),
        (["generate", "--chat"] + src, 2, "--chat and --system render --prompt messages"),
        (["generate", "--coordinator", "127.0.0.1"] + src, 2, "--num-processes, --process-id missing"),
        (["generate", "--process-id", "2"] + job + src, 2, "--process-id=2 must be in 0..1 for --num-processes=2"),
        (["generate", "--coordinator", "h:x", "--num-processes", "2", "--process-id", "0"] + src, 2,
         "--coordinator='h:x' must be HOST:PORT with PORT in 1..65534"),
        (["generate", "--cluster-detection", "slurm", "--process-id", "0"] + job + src, 2,
         "--cluster-detection (or JAX_COORDINATOR_ADDRESS) lets JAX find the job"),
        (["generate", "--local-device-ids", "0,a", "--process-id", "0"] + job + src, 2,
         "--local-device-ids must be comma-separated integers, got '0,a'"),
        # launch: generate's deprecated name, without --spawn-local
        (["launch", "--spawn-local", "2"] + src, 2, "unrecognized arguments: --spawn-local 2"),
        (["launch", "--cp", "0"] + src, 2, "argument --cp: expected an integer >= 1, got 0"),
    ]


_IDS = [" ".join(argv)[:70] or "(no arguments)" for argv, _, _ in _cases(Path("F"))]


@pytest.mark.parametrize("index", range(len(_IDS)), ids=_IDS)
def test_bad_command_lines_give_one_line_and_the_documented_code(files, capsys, index):
    argv, code, text = _cases(files)[index]
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcp-jax: error"), err
    assert text in lines[0], lines[0]


def test_library_rejections_of_generate_arguments_exit_2(files, monkeypatch, capsys):
    """top_k beyond the vocabulary is known only once the model is read; generate's ValueError (its
    argument checks come before any work) is a bad flag, exit 2, not a failed run."""
    import jax.numpy as jnp
    from pcp_jax.config import ModelConfig
    from pcp_jax.weights import random_params
    cfg = ModelConfig.from_dict(TINY)
    model = pcp_jax.Model(cfg, random_params(cfg, 0, jnp.float32), dtype="float32")
    monkeypatch.setattr(pcp_jax, "load_model", lambda *a, **k: model)
    assert cli.main(["generate", "--model", str(files / "empty"), "--ids", "1,2", "--top-k", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "top_k=100000" in err[0] and "512" in err[0], err


def test_interrupted_convert_exits_128_plus_the_signal(files, monkeypatch, capsys):
    import signal
    import pcp_jax.convert
    from pcp_jax.convert import ConvertInterrupted

    def interrupted(*args, **kwargs):
        raise ConvertInterrupted(signal.SIGTERM)
    monkeypatch.setattr(pcp_jax.convert, "convert", interrupted)
    assert cli.main(["convert", str(files / "hf"), str(files / "out4")]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pcp-jax: error: interrupted by SIGTERM; nothing was written to {files / 'out4'}"], err


def test_bench_with_a_failed_length_exits_1_with_one_line(monkeypatch, capsys):
    from pcp_jax.cli import bench
    monkeypatch.setattr(bench, "bench_ours", lambda args, cfg, lengths: [{"n": 64, "error": "OOM: no room"}])
    assert cli.main(["bench", "--preset", "demo", "--tokens", "64"]) == 1
    captured = capsys.readouterr()
    assert "| 64 | OOM: no room |" in captured.out
    assert captured.err.strip().splitlines() == [
        "pcp-jax: error: 1 of 1 prompt lengths failed (see the table); the first, 64 tokens: OOM: no room"]


def test_debug_adds_the_traceback(files, capsys):
    argv = ["generate", "--model", str(files / "model"), "--prompt", "hi"]
    assert cli.main(["--debug"] + argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("pcp-jax: error: cannot read the tokenizer")
    assert cli.main(argv + ["--debug"]) == 1 and "Traceback" in capsys.readouterr().err


def test_no_parser_accepts_abbreviations():
    from pcp_jax.cli import bench
    top = cli.build_parser()
    subs = next(a for a in top._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for parser in [top, *subs.values(), bench.build_parser()]:
        assert parser.allow_abbrev is False, parser.prog


def _run(*args, env=None, timeout=60):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), cwd=os.path.dirname(os.path.dirname(__file__)))


CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "pcp-jax")


@pytest.mark.parametrize("args,text", [
    ([sys.executable, "-m", "pcp_jax.cli", "bench", "--preset", "nope"], "unknown preset 'nope'"),
    ([sys.executable, "-m", "pcp_jax.cli", "generate", "--preset", "demo", "--ids", "1", "--save",
      "/nonexistent-pcp/x.npz"], "create it first"),
    ([CONSOLE_SCRIPT, "generate", "--preset", "nope", "--ids", "1"], "unknown preset 'nope'"),
], ids=["python -m pcp_jax.cli bench", "python -m pcp_jax.cli generate", "pcp-jax generate"])
def test_entry_points_as_processes(args, text):
    r = _run(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and text in lines[0], r.stderr[-2000:]


def test_launch_is_generate_with_a_deprecation_note(files, capsys):
    """`launch` runs generate (here: as far as generate's own check of --save) after one note on stderr."""
    assert cli.main(["launch", "--preset", "demo", "--ids", "1", "--save", str(files / "missing" / "x.npz")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("pcp-jax: note: `pcp-jax launch` is now `pcp-jax generate`"), lines
    assert lines[1].startswith("pcp-jax: error: --save=") and "create it first" in lines[1], lines

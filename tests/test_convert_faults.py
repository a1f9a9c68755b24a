"""Converted folders under faults (issue 14): weights digest, relative paths, permissions, integrity,
interrupted and failed conversions.

- weights_digest changes under a permutation of values (per-tensor sums did not), and a converted folder
  stores the digest of what it holds;
- relative paths convert and load;
- folders and files get the umask's modes, an existing OUT_DIR keeps its mode, copies are never more
  readable than their source;
- a flipped or truncated byte in any file fails the load with one line naming the unit; verify=False and
  PCP_JAX_SKIP_VERIFY=1 skip the check;
- a disk-full error is one line with no partial folder; SIGTERM/SIGINT of a real conversion leave nothing;
  a folder left by a killed one is removed by the next conversion.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from hf_models import build
from pcp_jax import loading
from pcp_jax.cli import main as cli_main
from pcp_jax.convert import ConvertError, convert, is_orbax_dir, load_orbax, read_hf_params
from pcp_jax.convert import orbax_io
from tiny import tiny_config, tiny_params

CONFIG_NAME = "pcp_config.json"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "hf"
    build(seed=7).save_pretrained(str(path))
    (path / "tokenizer.json").write_text('{"model": {}}')
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    return convert(hf_dir, tmp_path_factory.mktemp("conv") / "out", dtype="float32", progress=False)


def _partials(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".partial-" in n]


# Item 3: weights digest ---------------------------------------------------------------------------------
def test_weights_digest_sees_permutations():
    params = tiny_params(tiny_config())
    base = loading.weights_digest(params)
    assert isinstance(base, bytes) and len(base) == 32
    permuted = dict(params, **{"layers.0.mlp.gate_proj": params["layers.0.mlp.gate_proj"][::-1]})
    assert np.isclose(permuted["layers.0.mlp.gate_proj"].sum(), params["layers.0.mlp.gate_proj"].sum())
    assert loading.weights_digest(permuted) != base
    swapped = dict(params, **{"layers.0.input_norm": params["layers.0.post_norm"],
                              "layers.0.post_norm": params["layers.0.input_norm"]})
    assert loading.weights_digest(swapped) != base
    assert loading.weights_digest(dict(reversed(params.items()))) == base
    assert loading.weights_digest({k: jax.numpy.asarray(v) for k, v in params.items()}) == base
    assert loading.weights_digest({k: v.astype(jax.numpy.bfloat16) for k, v in params.items()}) != base


def test_converted_folder_stores_its_digest(hf_dir, converted):
    _, params, digest = loading.load_params_with_digest(converted, "float32")
    assert digest == orbax_io.stored_weights_digest(converted) == loading.weights_digest(params)
    _, hf_params, hf_digest = loading.load_params_with_digest(hf_dir, "float32")
    assert hf_digest == digest == loading.weights_digest(read_hf_params(hf_dir, None, "float32"))
    cfg, plain = loading.load_params(converted, "float32")
    assert set(plain) == set(params)


# Item 4: relative paths ----------------------------------------------------------------------------------
def test_relative_paths_convert_and_load(hf_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["convert", os.path.relpath(hf_dir), "conv32", "--dtype", "float32", "--no-progress"]) == 0
    assert is_orbax_dir("conv32")
    _, params = loading.load_params("conv32", "float32")
    _, again = load_orbax("conv32")
    np.testing.assert_array_equal(params["embed"], again["embed"])


# Item 8: permissions --------------------------------------------------------------------------------------
@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    os.umask(old)
    yield set_umask
    os.umask(old)


def _modes(root) -> dict[str, int]:
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for parent, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(parent, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_modes_follow_the_umask(hf_dir, tmp_path, umask):
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in os.listdir(hf_dir):
        os.symlink(hf_dir / f, hf / f)
    secret = tmp_path / "secret_tokenizer_config.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    (hf / "tokenizer_config.json").symlink_to(secret)
    os.chmod(hf_dir / "tokenizer.json", 0o644)
    umask(0o027)
    out = convert(hf, tmp_path / "out", dtype="float32", progress=False)
    modes = _modes(out)
    assert modes.pop("tokenizer_config.json") == 0o600  # never more readable than its source
    assert modes.pop("tokenizer.json") == 0o640
    dirs = {k: m for k, m in modes.items() if os.path.isdir(os.path.join(out, k))}
    files = {k: m for k, m in modes.items() if k not in dirs}
    assert set(dirs.values()) == {0o750}, dirs
    assert set(files.values()) == {0o640}, files

    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)
    umask(0o077)
    convert(hf, existing, dtype="float32", progress=False)
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o755


# Item 9: integrity ---------------------------------------------------------------------------------------
def _largest_file(folder) -> str:
    files = [os.path.join(p, f) for p, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_flipped_byte_fails_the_load(converted, tmp_path, monkeypatch):
    out = _copy(converted, tmp_path / "out")
    _, good = load_orbax(out)
    chunk = _largest_file(os.path.join(out, "params", "layers.1"))
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(ConvertError) as err:
        load_orbax(out)
    msg = str(err.value)
    assert "\n" not in msg and f"integrity check failed for unit 'layers.1' of {out}: {chunk}" in msg, msg
    with pytest.raises(ConvertError, match="integrity check failed for unit 'layers.1'"):
        loading.load_params(out, "float32")
    # Skipping the check loads the corrupted weights (which is why it is on by default).
    _, bad = load_orbax(out, verify=False)
    assert any(not np.array_equal(bad[n], good[n]) for n in good if n.startswith("layers.1."))
    monkeypatch.setenv("PCP_JAX_SKIP_VERIFY", "1")
    loading.load_params(out, "float32")


def test_edited_metadata_and_copied_files_fail_the_load(converted, tmp_path):
    out = _copy(converted, tmp_path / "out")
    meta_path = os.path.join(out, CONFIG_NAME)
    meta = json.load(open(meta_path))
    meta["config"]["rope_theta"] *= 2
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ConvertError, match=f"integrity check failed for {meta_path}"):
        load_orbax(out)
    out = _copy(converted, tmp_path / "out2")
    with open(os.path.join(out, "tokenizer.json"), "a") as f:
        f.write(" ")
    with pytest.raises(ConvertError, match=r"integrity check failed for the files copied into .*tokenizer.json has"):
        load_orbax(out)


# Item 13: converted folders with bad metadata or chunks -------------------------------------------------
@pytest.mark.parametrize("edit,message", [
    (lambda m: m["config"].update(bogus=1), "invalid model config: unknown config fields ['bogus']"),
    (lambda m: m["config"].pop("rope_theta"), "'config' lacks fields ['rope_theta']"),
    (lambda m: m["config"].update(num_heads=None), "invalid model config: num_heads=None must be a positive"),
    (lambda m: m.update(config=[1]), "field 'config' is [1]; expected an object"),
    (lambda m: m.update(units="embed"), "field 'units' is 'embed'; expected a list of unit names"),
    (lambda m: m["integrity"]["units"]["embed"].update({"../../x": "0" * 64}),
     "unit 'embed' names '../../x'; expected a relative path inside the folder"),
])
def test_bad_metadata_names_the_field(converted, tmp_path, edit, message):
    out = _copy(converted, tmp_path / "out")
    meta_path = os.path.join(out, CONFIG_NAME)
    meta = json.load(open(meta_path))
    edit(meta)
    json.dump(meta, open(meta_path, "w"))
    for verify in (False, True):  # field checks come before the integrity check
        with pytest.raises(ConvertError) as err:
            load_orbax(out, verify=verify)
        assert str(err.value).startswith(meta_path) and message in str(err.value), str(err.value)


def test_truncated_chunk_is_one_error(converted, tmp_path):
    out = _copy(converted, tmp_path / "out")
    chunk = _largest_file(os.path.join(out, "params", "embed"))
    data = open(chunk, "rb").read()
    open(chunk, "wb").write(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="integrity check failed for unit 'embed'"):
        load_orbax(out)
    with pytest.raises(ConvertError) as err:
        load_orbax(out, verify=False)
    msg = str(err.value)
    assert msg.startswith(f"cannot restore {os.path.join(out, 'params', 'embed')}: ") and "\n" not in msg, msg


def test_disk_full_is_one_line_and_leaves_nothing(hf_dir, tmp_path, monkeypatch, capsys, caplog):
    """ENOSPC inside Orbax's writer threads (which log their own tracebacks) or while copying files."""
    import orbax.checkpoint as ocp

    from pcp_jax.convert import workdir
    real = ocp.type_handlers.NumpyHandler._open_and_write
    calls = []

    async def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(ocp.type_handlers.NumpyHandler, "_open_and_write", full_disk)
    with caplog.at_level(logging.WARNING):
        assert cli_main(["convert", str(hf_dir), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and f"of {out} failed" in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert os.listdir(tmp_path) == []

    monkeypatch.undo()

    def full_copy(src, dst, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(workdir.shutil, "copyfileobj", full_copy)
    assert cli_main(["convert", str(hf_dir), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"writing {out} failed: [Errno 28] No space left on device" in err, err
    assert os.listdir(tmp_path) == []


# Item 11: interrupted conversions ------------------------------------------------------------------------
# The child converts with one hook: `where` = "read" blocks in reading layer 2 (outside any Orbax call),
# "write" blocks inside the save of unit layers.1 for a while (where the signal must be held), then prints
# READY and waits to be signalled.
_CHILD = textwrap.dedent("""
    import sys, time
    import orbax.checkpoint as ocp
    import pcp_jax.convert.hf_loader as hf_loader
    from pcp_jax.cli import main as cli_main
    hf, out, where = sys.argv[1:4]

    def ready_then_wait(seconds):
        print("READY", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)

    real_materialise = hf_loader.materialise
    def materialise(ckpt, source, dtype):
        if where == "read" and source.name == "layers.2.input_norm":
            ready_then_wait(60)
        return real_materialise(ckpt, source, dtype)
    hf_loader.materialise = materialise

    real_save = ocp.Checkpointer.save
    def save(self, directory, *args, **kwargs):
        if where == "write" and str(directory).endswith("layers.1"):
            ready_then_wait(1.5)
        return real_save(self, directory, *args, **kwargs)
    ocp.Checkpointer.save = save
    sys.exit(cli_main(["convert", hf, out, "--no-progress", "--dtype", "float32"]))
""")


def _start_child(tmp_path, hf_dir, out, where):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(script), str(hf_dir), str(out), where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_ready(proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "READY":
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"child never got ready: rc={proc.wait()}, stderr={proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig,where", [(signal.SIGTERM, "read"), (signal.SIGINT, "write")])
def test_signal_removes_the_partial_folder(hf_dir, tmp_path, sig, where):
    parent = tmp_path / "target"
    parent.mkdir()
    proc = _start_child(tmp_path, hf_dir, parent / "out", where)
    _wait_ready(proc)
    assert _partials(parent), "the child should be writing by now"
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert rc == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err.strip().splitlines()[-1], err
    assert os.listdir(parent) == [], os.listdir(parent)


def test_killed_conversion_is_cleaned_by_the_next_one(hf_dir, tmp_path):
    parent = tmp_path / "target"
    parent.mkdir()
    proc = _start_child(tmp_path, hf_dir, parent / "out", "read")
    _wait_ready(proc)
    proc.kill()
    proc.wait(timeout=60)
    left = _partials(parent)
    assert len(left) == 1  # SIGKILL cannot be handled
    # Folders of a live process (ours), of another host, or not named by us are kept.
    from pcp_jax.convert.workdir import _host_tag, partial_prefix
    prefix = partial_prefix(str(parent / "out"))
    keep = [f"{prefix}{_host_tag()}-{os.getpid()}-abc", f"{prefix}otherhost-{proc.pid}-abc", f"{prefix}xyz"]
    for name in keep:
        (parent / name).mkdir()
    convert(hf_dir, parent / "out", dtype="float32", progress=False)
    assert sorted(os.listdir(parent)) == sorted(keep + ["out"])

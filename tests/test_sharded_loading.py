"""Sharded loading: each device's block of every weight read straight from the checkpoint.

- `SafetensorsSource` (HF folders) and `OrbaxSource` (converted folders) return, for any slices, exactly the
  block of the tensor that `read_hf_params` / `load_orbax` return whole (bit for bit, every dtype, every
  expert layout);
- `place_params` over either source on a (cp, tp) mesh equals `place_params` over the whole tensors;
- no read returns more than the block a device holds: per call at most one device's block of one source
  tensor, in total each distinct block once; the HF reader allocates nothing beyond the block it returns;
- `load_model` over a (cp, tp) mesh gives transformers' logits, from either folder kind;
- integrity checks of converted folders still apply; bad paths and a `tp` that does not split the model give
  the errors they gave before (or a one-line flag error on the command line).
"""

from __future__ import annotations

import math
import os
import shutil
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_models import build, hf_logits, rel_err
from jax.sharding import Mesh
from safetensors.torch import load_file, save_file

import pcp_jax
from pcp_jax import cli, loading
from pcp_jax.convert import ConvertError, convert, load_orbax, read_hf_params, stored_weights_digest
from pcp_jax.convert.sources import OrbaxSource, SafetensorsSource
from pcp_jax.parallel.tensor import DictSource, place_params, placements

# Splittable at tp=8: query/value heads, vocabulary, MLP and experts divisible by 8; 2 KV / key heads repeated.
SPLIT = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, linear_num_key_heads=2,
             linear_num_value_heads=8, layer_types=["linear_attention", "full_attention"] * 2)
DENSE = dict(SPLIT, hidden_size=64, vocab_size=2048, intermediate_size=64)
MOE = dict(SPLIT, vocab_size=72, num_experts=8, shared_expert_intermediate_size=16)
MESHES = [(2, 4), (1, 8)]
LAYOUTS = [(2, 2), (2, 1)]  # (period, groups): every layer stacked; one group stacked and two layers flat


def mesh_of(cp: int, tp: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:cp * tp]).reshape(cp, tp), ("cp", "tp"))


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def fuse_experts(src: str, dst: str) -> str:
    """A copy of an HF MoE folder with experts stored fused (gate_up_proj [E, 2Fe, D], down_proj [E, D, Fe])."""
    shutil.copytree(src, dst)
    tensors = {}
    for name in sorted(os.listdir(dst)):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            if name.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(dst, name)))
            os.remove(os.path.join(dst, name))
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    layers = {k.split(".mlp.experts.")[0] for k in tensors if ".mlp.experts." in k}
    for layer in layers:
        e = layer + ".mlp.experts."
        stack = lambda p: torch.stack([tensors[e + f"{x}.{p}.weight"] for x in range(MOE["num_experts"])])
        fused[e + "gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        fused[e + "down_proj"] = stack("down_proj")
    save_file({k: v.contiguous() for k, v in fused.items()}, os.path.join(dst, "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    out["dense_model"] = build(**DENSE)
    out["dense_model"].save_pretrained(root / "dense", max_shard_size="200KB")
    build(moe=True, seed=1, **MOE).save_pretrained(root / "moe")  # one tensor per expert
    out["dense"], out["moe"] = str(root / "dense"), str(root / "moe")
    out["moe_fused"] = fuse_experts(out["moe"], str(root / "moe_fused"))
    out["dense_conv"] = convert(out["dense"], root / "dense_conv", dtype="float32", progress=False)
    out["moe_conv"] = convert(out["moe"], root / "moe_conv", dtype="bfloat16", progress=False)
    return out


def _random_slices(rng, shape):
    out = []
    for n in shape:
        i, j = sorted(int(v) for v in rng.integers(0, n + 1, 2))
        out.append(slice(i, j))
    return tuple(out[: int(rng.integers(0, len(shape) + 1))])  # sometimes fewer slices than axes


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_fused"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_blocks_equal_the_whole_tensors(folders, kind, dtype):
    full = read_hf_params(folders[kind], None, dtype)
    source = SafetensorsSource(folders[kind], None, dtype)
    assert list(source.names()) == list(full)
    rng = np.random.default_rng(0)
    for name, whole in full.items():
        assert source.shape(name) == whole.shape
        for _ in range(4):
            idx = _random_slices(rng, whole.shape)
            block = source.read(name, idx)
            assert block.dtype == whole.dtype and block.flags.c_contiguous, name
            np.testing.assert_array_equal(bits(block), bits(whole[idx]), err_msg=f"{name}{idx}")


@pytest.mark.parametrize("kind,dtype", [("dense_conv", None), ("moe_conv", None), ("moe_conv", "float32")])
def test_orbax_blocks_equal_the_whole_tensors(folders, kind, dtype):
    cfg, full = load_orbax(folders[kind], dtype=dtype)
    source = OrbaxSource(folders[kind], dtype=dtype)
    assert source.cfg == cfg and sorted(source.names()) == sorted(full)
    assert source.weights_digest == stored_weights_digest(folders[kind])
    rng = np.random.default_rng(1)
    for name, whole in full.items():
        assert source.shape(name) == whole.shape
        for _ in range(3):
            idx = _random_slices(rng, whole.shape)
            block = source.read(name, idx)
            assert block.dtype == whole.dtype, name
            np.testing.assert_array_equal(bits(block), bits(whole[idx]), err_msg=f"{name}{idx}")
        source.release(name)


def _open(folders, kind, dtype):
    """(source, the same params whole in a DictSource) for a folder kind."""
    if kind.endswith("_conv"):
        return OrbaxSource(folders[kind]), DictSource(load_orbax(folders[kind])[1])
    return SafetensorsSource(folders[kind], None, dtype), DictSource(read_hf_params(folders[kind], None, dtype))


@pytest.mark.parametrize("cp,tp", MESHES)
@pytest.mark.parametrize("kind", ["dense", "moe_fused", "dense_conv", "moe_conv"])
def test_place_params_from_sources(folders, kind, cp, tp):
    source, whole = _open(folders, kind, "float32")
    mesh = mesh_of(cp, tp)
    for period, groups in LAYOUTS:
        got = place_params(source.cfg, mesh, source, np.float32, period, groups)
        want = place_params(source.cfg, mesh, whole, np.float32, period, groups)
        assert list(got) == list(want)
        for name, arr in want.items():
            assert got[name].sharding == arr.sharding, name
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(arr), err_msg=name)


class Recorder:
    """A source that forwards to `source` and records (name, bytes returned) of every read."""

    def __init__(self, source, trace: bool = False):
        self.source, self.trace, self.calls = source, trace, []

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def read(self, name, idx):
        if self.trace:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
        block = self.source.read(name, idx)
        extra = tracemalloc.get_traced_memory()[1] - before - block.nbytes if self.trace else 0
        self.calls.append((name, block.nbytes, extra))
        return block

    def release(self, name):
        if hasattr(self.source, "release"):
            self.source.release(name)


@pytest.mark.parametrize("cp,tp", MESHES)
@pytest.mark.parametrize("kind", ["dense", "moe", "moe_fused", "dense_conv", "moe_conv"])
def test_no_read_exceeds_a_device_block(folders, kind, cp, tp):
    source, _ = _open(folders, kind, "float32")
    cfg, mesh = source.cfg, mesh_of(cp, tp)
    trace = not kind.endswith("_conv")  # TensorStore's own buffers are not Python allocations
    rec = Recorder(source, trace)
    if trace:
        tracemalloc.start()
    try:
        place_params(cfg, mesh, rec, np.float32, 2, 2)
    finally:
        if trace:
            tracemalloc.stop()
    itemsize = np.dtype(source.dtype).itemsize
    per_source_block, distinct_bytes = {}, 0
    for p in placements(cfg, tp, 2, 2):
        blocks = {tuple((s.start, s.stop) for s in idx)
                  for idx in jax.sharding.NamedSharding(mesh, p.spec(tp)).devices_indices_map(p.shape).values()}
        block_shape = p.shape if p.split is None else tuple(
            n // tp if axis == p.split + p.stacked else n for axis, n in enumerate(p.shape))
        distinct_bytes += len(blocks) * math.prod(block_shape) * itemsize
        for s in p.sources:
            per_source_block[s] = math.prod(block_shape[p.stacked:]) * itemsize, p.split
    whole = {n: math.prod(source.shape(n)) * itemsize for n in source.names()}
    for name, nbytes, extra in rec.calls:
        block, split = per_source_block[name]
        assert nbytes <= block, (name, nbytes, block)
        if split is not None:
            assert nbytes < whole[name], f"{name}: a tp-split tensor was read whole ({nbytes} bytes)"
        # Nothing materialised beyond the returned block (numpy's small casting buffers and objects aside).
        assert extra <= 16 * 1024, (name, extra)
    assert sum(nbytes for _, nbytes, _ in rec.calls) == distinct_bytes


def test_reads_of_an_hf_tensor_touch_only_its_experts(folders):
    source = SafetensorsSource(folders["moe"], None, "float32")
    mapped = []
    real = source._map
    source._map = lambda hf_name: mapped.append(hf_name) or real(hf_name)
    block = source.read("layers.0.moe.down_proj", (slice(2, 4),))
    assert block.shape[0] == 2
    assert sorted(mapped) == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in (2, 3)]


def test_orbax_source_verifies_each_unit_before_reading_it(folders, tmp_path):
    path = shutil.copytree(folders["dense_conv"], tmp_path / "conv")
    unit = path / "params" / "layers.1"
    victim = max((p for p in unit.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    source = OrbaxSource(path)
    source.read("layers.0.gdn.A_log", ())  # other units still read
    with pytest.raises(ConvertError, match="integrity check failed for unit 'layers.1'"):
        source.read("layers.1.attn.q_norm", ())
    with pytest.raises(ConvertError, match="integrity check failed for unit 'layers.1'"):
        place_params(source.cfg, mesh_of(1, 2), OrbaxSource(path), np.float32, 2, 2)
    try:  # opted out: no digest compared (TensorStore may still notice the damage, in its own words)
        OrbaxSource(path, verify=False).read("layers.1.attn.q_norm", ())
    except ConvertError as e:
        assert "integrity check" not in str(e)


def test_open_source_kinds_and_digests(folders):
    cfg, source, digest = loading.open_source(folders["dense"], "bfloat16")
    assert isinstance(source, SafetensorsSource) and digest is None and source.dtype == ml_dtypes.bfloat16
    cfg2, source, digest = loading.open_source(os.path.relpath(folders["moe_conv"]), "float32")
    assert isinstance(source, OrbaxSource) and digest == stored_weights_digest(folders["moe_conv"])
    assert source.dtype == np.float32 and cfg2 == loading.model_config(folders["moe_conv"])
    assert cfg == loading.model_config(folders["dense"])


def test_bad_paths_give_the_same_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "config_only").mkdir()  # an HF config.json, no weights
    build(**MOE).config.to_json_file(tmp_path / "config_only" / "config.json")
    cases = [(tmp_path / name, "float32") for name in ("missing", "file", "empty", "config_only")]
    cases.append((tmp_path / "config_only", "float16"))
    for path, dtype in cases:
        with pytest.raises(ValueError) as old:
            loading.load_params(path, dtype)
        for call in (lambda: loading.open_source(path, dtype), lambda: pcp_jax.load_model(path, dtype=dtype)):
            with pytest.raises(ValueError) as new:
                call()
            assert type(new.value) is type(old.value) and str(new.value) == str(old.value), path


@pytest.mark.parametrize("kind,cp,tp", [("dense", 2, 4), ("dense_conv", 1, 8)])
def test_load_model_over_tp_matches_transformers(folders, kind, cp, tp):
    ids = np.random.default_rng(0).integers(0, DENSE["vocab_size"], (1, 12))
    model = pcp_jax.load_model(folders[kind], cp=cp, tp=tp, dtype="float32")
    assert (model.cp, model.tp) == (cp, tp)
    assert rel_err(model.logits(ids), hf_logits(folders["dense_model"], ids)) <= 1e-5


def test_load_model_refuses_a_tp_that_does_not_split(folders):
    with pytest.raises(ValueError, match=r"tp=3 does not split this model: num_heads=8, linear_num_value_heads=8"):
        pcp_jax.load_model(folders["dense"], tp=3)


def test_cli_tp_errors(folders, capsys):
    gen = ["generate", "--model", folders["dense"], "--ids", "1,2"]
    for argv, message in [
        (gen + ["--tp", "0"], "argument --tp: expected an integer >= 1, got 0"),
        (gen + ["--cp", "4", "--tp", "4"], "--cp=4 x --tp=4 needs 16 devices but 8 cpu device(s) are visible"),
        (gen + ["--tp", "3"], "--tp=3 does not split this model: num_heads=8"),
        (["warmup", "--model", folders["dense_conv"], "--max-tokens", "8", "--tp", "3"], "--tp=3 does not split"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pcp-jax: error: ") and message in err[0], (argv, err)


def test_generate_mesh():
    """The CLI's mesh (`generate` in one process or a job, `warmup`): --cp x --tp devices, named flags when the
    devices are too few, and a --tp that does not split the model refused before any weight is read."""
    from pcp_jax.cli import build_parser
    from pcp_jax.cli.args import mesh_for
    from pcp_jax.cli.errors import UsageError
    from pcp_jax.cli.inputs import prepare

    mesh = mesh_for(None, 2)
    assert dict(mesh.shape) == {"cp": 4, "tp": 2}
    assert mesh.devices.reshape(-1).tolist() == sorted(jax.devices(), key=lambda d: d.id)
    assert dict(mesh_for(2, 4).shape) == {"cp": 2, "tp": 4}
    assert dict(mesh_for(None, 1).shape) == {"cp": 8, "tp": 1}
    for cp, tp, message in [(4, 4, "--cp=4 x --tp=4 needs 16 devices but 8 cpu device(s) are visible"),
                            (None, 16, "--tp=16 needs 16 devices but 8 cpu"),
                            (16, 1, "--cp=16 needs 16 devices")]:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            mesh_for(cp, tp)
    args = build_parser().parse_args(["generate", "--preset", "demo", "--ids", "1", "--tp", "3"])
    with pytest.raises(UsageError, match="--tp=3 does not split this model"):
        prepare(args, writer=False, identify=False)

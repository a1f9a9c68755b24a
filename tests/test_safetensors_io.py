"""Our safetensors reader against files written by the `safetensors` library, and against broken files.

Exact: every value read equals the tensor written (compared bit for bit). Each broken file must fail with a
ConvertError whose message names the file and what is wrong.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pcp_jax.convert import ConvertError
from pcp_jax.convert.safetensors_io import SafetensorsCheckpoint, SafetensorsFile


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(f"u{x.dtype.itemsize}") if x.dtype.itemsize > 1 else x.view("u1")


def _raw_file(path, header: dict, data: bytes = b"", header_len: int | None = None):
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def test_reads_every_dtype_exactly(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "f64": torch.randn(2, 2, 2, dtype=torch.float64),
        "i8": torch.randint(-128, 127, (6,), dtype=torch.int8),
        "i64": torch.randint(-10**9, 10**9, (2, 3), dtype=torch.int64),
        "u8": torch.randint(0, 255, (5,), dtype=torch.uint8),
        "bool": torch.rand(4) > 0.5,
        "f8": torch.randn(9).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert set(f.tensors) == set(tensors)
    for name, t in tensors.items():
        got = f.read(name)
        want = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else (
            t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn) if t.dtype == torch.float8_e4m3fn else t.numpy())
        assert got.shape == tuple(t.shape) and got.dtype == want.dtype, name
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)
    assert f.tensors["bf16"].dtype == "BF16" and f.read("bf16").dtype == np.dtype(ml_dtypes.bfloat16)


def test_read_is_a_read_only_view(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(10, dtype=torch.float32)}, str(path))
    a = SafetensorsFile(path).read("a")
    with pytest.raises(ValueError):
        a[0] = 1.0


@pytest.mark.parametrize("case, message", [
    ("short", "too short for the 8-byte"),
    ("header_len_past_end", "(truncated file)"),
    ("header_len_huge", "above the safetensors limit"),
    ("not_json", "not valid UTF-8 JSON"),
    ("not_object", "expected a JSON object"),
    ("unknown_dtype", "unsupported dtype 'Q4'"),
    ("bad_shape", "shape must be a list of non-negative integers"),
    ("size_mismatch", "span 12 bytes but F32[2, 2] needs 16"),
    ("data_truncated", "needs bytes [0, 16) of the data section but the file holds only 10"),
    ("overlap", "tensors 'a' and 'b' overlap"),
])
def test_broken_files_name_the_problem(tmp_path, case, message):
    p = tmp_path / "bad.safetensors"
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "header_len_past_end":
        _raw_file(p, {"a": entry}, bytes(16), header_len=10_000)
    elif case == "header_len_huge":
        _raw_file(p, {"a": entry}, bytes(16), header_len=2**40)
    elif case == "not_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{oops" + bytes(16))
    elif case == "not_object":
        _raw_file(p, [1, 2])
    elif case == "unknown_dtype":
        _raw_file(p, {"a": dict(entry, dtype="Q4")}, bytes(16))
    elif case == "bad_shape":
        _raw_file(p, {"a": dict(entry, shape=[2, -2])}, bytes(16))
    elif case == "size_mismatch":
        _raw_file(p, {"a": dict(entry, data_offsets=[0, 12])}, bytes(16))
    elif case == "data_truncated":
        _raw_file(p, {"a": entry}, bytes(10))
    elif case == "overlap":
        _raw_file(p, {"a": entry, "b": dict(entry, data_offsets=[8, 24])}, bytes(24))
    with pytest.raises(ConvertError) as err:
        SafetensorsFile(p)
    assert message in str(err.value)
    assert str(p) in str(err.value)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(8)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ConvertError, match=r"truncated file"):
        SafetensorsCheckpoint(tmp_path)


def _sharded(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "s1.safetensors"))
    save_file({"c": torch.full((4,), 2.0)}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_sharded_folder_follows_the_index(tmp_path):
    _sharded(tmp_path)
    ck = SafetensorsCheckpoint(tmp_path)
    assert sorted(ck.tensors) == ["a", "b", "c"]
    np.testing.assert_array_equal(ck.read("c"), np.full((4,), 2.0, np.float32))


def test_missing_shard_is_named(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(ConvertError, match=r"missing shard file\(s\) named in .*index.json: s2.safetensors \(1 tensors"):
        SafetensorsCheckpoint(tmp_path)


def test_index_and_shard_headers_must_agree(tmp_path):
    index = _sharded(tmp_path)
    index["weight_map"]["d"] = "s2.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match=r"places 'd' in .*s2.safetensors, whose header lacks them"):
        SafetensorsCheckpoint(tmp_path)
    del index["weight_map"]["d"], index["weight_map"]["b"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match=r"s1.safetensors holds 'b', which .* places elsewhere or omits"):
        SafetensorsCheckpoint(tmp_path)


def test_unindexed_shards_and_duplicates(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    assert sorted(SafetensorsCheckpoint(tmp_path).tensors) == ["a", "b"]
    save_file({"a": torch.ones(2)}, str(tmp_path / "three.safetensors"))
    with pytest.raises(ConvertError, match=r"tensor 'a' is defined twice"):
        SafetensorsCheckpoint(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(ConvertError, match=r"holds no model.safetensors.index.json, no model.safetensors"):
        SafetensorsCheckpoint(tmp_path)


@pytest.mark.parametrize("where", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_cannot_leave_the_folder(tmp_path, monkeypatch, where):
    """An index naming a shard outside the folder is refused before any file is opened (issue 14, item 13)."""
    from pcp_jax.convert import safetensors_io

    folder = tmp_path / "model"
    folder.mkdir()
    index = _sharded(folder)
    outside = tmp_path / "outside.safetensors"
    save_file({"c": torch.full((4,), 2.0)}, str(outside))
    index["weight_map"]["c"] = str(outside) if where == "ABSOLUTE" else where
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    opened = []
    real = safetensors_io._parse_header
    monkeypatch.setattr(safetensors_io, "_parse_header", lambda p: opened.append(p) or real(p))
    with pytest.raises(ConvertError) as err:
        SafetensorsCheckpoint(folder)
    assert f"places 1 tensors (e.g. 'c') in {index['weight_map']['c']!r}, outside the model folder" in str(err.value)
    assert opened == []


def test_index_shard_in_a_subfolder_and_symlinked_shard(tmp_path):
    # Shards may sit in a subfolder, and may be symlinks leaving the folder (the Hugging Face cache links
    # snapshot files to ../../blobs): only the name in the index is checked.
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    index = _sharded(folder)
    (folder / "s2.safetensors").rename(tmp_path / "blob")
    (folder / "sub" / "s2.safetensors").symlink_to(tmp_path / "blob")
    index["weight_map"]["c"] = "sub/s2.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(SafetensorsCheckpoint(folder).read("c"), np.full((4,), 2.0, np.float32))


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "expected an object whose 'weight_map' maps tensor names to shard file names"),
    (b'{"weight_map": {"a": 3}}', "expected an object whose 'weight_map'"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_malformed_index(tmp_path, content, message):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(ConvertError, match=message):
        SafetensorsCheckpoint(tmp_path)

"""The safetensors reader: round trips and bad files with clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from aigw_models import safetensors as st
from aigw_models.safetensors import SafetensorsError


def _write_raw(path: Path, header: object, data: bytes = b"", header_len: int = -1) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len < 0 else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)


def test_round_trip_f32_f16_bf16(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
               "b": rng.standard_normal(5).astype(np.float32),
               "c": rng.standard_normal((2, 2, 2)).astype(np.float32)}
    path = tmp_path / "m.safetensors"
    st.save(str(path), tensors, dtypes={"b": "F16", "c": "BF16"}, metadata={"format": "pt"})
    f = st.SafeFile(str(path))
    assert f.metadata == {"format": "pt"}
    assert {k: f.tensors[k].dtype for k in f.keys()} == {"a": "F32", "b": "F16", "c": "BF16"}
    np.testing.assert_array_equal(f.get("a"), tensors["a"])
    np.testing.assert_allclose(f.get("b"), tensors["b"], rtol=1e-3)
    np.testing.assert_allclose(f.get("c"), tensors["c"], rtol=1e-2)
    assert f.get("c").dtype == np.float32


def test_bf16_decoding_exact_values(tmp_path: Path) -> None:
    # 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00 in bfloat16
    data = struct.pack("<3H", 0x3F80, 0xC000, 0x3F00)
    path = tmp_path / "x.safetensors"
    _write_raw(path, {"t": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, data)
    np.testing.assert_array_equal(st.SafeFile(str(path)).get("t"), [1.0, -2.0, 0.5])


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    st.save(str(path), {"w": np.ones((10, 10), np.float32)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-50])
    with pytest.raises(SafetensorsError, match="out of range.*truncated"):
        st.SafeFile(str(path))
    path.write_bytes(raw[:5])
    with pytest.raises(SafetensorsError, match="truncated"):
        st.SafeFile(str(path))
    path.write_bytes(raw[:20])
    with pytest.raises(SafetensorsError, match="truncated"):
        st.SafeFile(str(path))


def test_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    _write_raw(path, b"{not json")
    with pytest.raises(SafetensorsError, match="bad header"):
        st.SafeFile(str(path))
    _write_raw(path, [1, 2, 3])
    with pytest.raises(SafetensorsError, match="not a JSON object"):
        st.SafeFile(str(path))
    _write_raw(path, {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8)
    with pytest.raises(SafetensorsError, match="data_offsets"):
        st.SafeFile(str(path))
    _write_raw(path, {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(SafetensorsError, match="needs 12 bytes"):
        st.SafeFile(str(path))
    _write_raw(path, b"{}", header_len=1 << 40)
    with pytest.raises(SafetensorsError, match="header length"):
        st.SafeFile(str(path))


def test_wrong_dtype(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    _write_raw(path, {"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(SafetensorsError, match="unknown dtype 'F99'"):
        st.SafeFile(str(path))
    _write_raw(path, {"t": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    f = st.SafeFile(str(path))
    with pytest.raises(SafetensorsError, match="dtype I32, expected one of F32, F16, BF16"):
        f.get("t")


def test_offsets_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "o.safetensors"
    _write_raw(path, {"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 8)
    with pytest.raises(SafetensorsError, match="out of range"):
        st.SafeFile(str(path))


def test_sharded_index(tmp_path: Path) -> None:
    st.save(str(tmp_path / "a.safetensors"), {"x": np.ones(2, np.float32)})
    st.save(str(tmp_path / "b.safetensors"), {"y": np.zeros(3, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    w = st.open_model_weights(str(tmp_path))
    assert sorted(w) == ["x", "y"]
    np.testing.assert_array_equal(w["y"], np.zeros(3))

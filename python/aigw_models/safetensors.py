"""Read and write the safetensors format with numpy, no other dependency.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
unsigned header length N, N bytes of UTF-8 JSON mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
byte after the header) plus an optional ``"__metadata__"`` map of strings,
then the raw little-endian tensor bytes.

Reading is strict: a truncated file, a header that is not a JSON object, an
unknown or unsupported dtype, a shape whose size does not match its byte
range, or offsets outside the data area raise ``SafetensorsError`` with the
file name and the tensor at fault — never a numpy exception from deep inside.
F32 tensors are memory-mapped (no copy); F16 and BF16 are converted to
float32 on access (BF16 by shifting into the high half of a uint32).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

HEADER_MAX = 100 * 1024 * 1024  # the reference implementation's limit

#  dtype name -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES: Dict[str, Tuple[str, int]] = {
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "F64": ("<f8", 8),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),
}
#  Dtypes a model weight may have (the others are readable as raw arrays).
FLOAT_DTYPES = ("F32", "F16", "BF16")


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a tensor we cannot use."""


class TensorInfo:
    """One header entry."""

    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: str, shape: Tuple[int, ...], begin: int, end: int
                 ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end


class SafeFile:
    """A safetensors file opened for reading (header parsed and validated)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise SafetensorsError(f"{path}: {exc.strerror}") from None
        if size < 8:
            raise SafetensorsError(f"{path}: truncated file ({size} bytes, no header length)")
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > HEADER_MAX:
                raise SafetensorsError(f"{path}: header length {n} exceeds {HEADER_MAX}")
            if 8 + n > size:
                raise SafetensorsError(f"{path}: truncated file (header of {n} bytes, "
                                       f"file has {size - 8})")
            raw = fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{path}: bad header: not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: bad header: not a JSON object")
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise SafetensorsError(f"{path}: bad header: __metadata__ is not an object")
        self.metadata: Dict[str, str] = {str(k): str(v) for k, v in (meta or {}).items()}
        self.tensors: Dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._entry(name, entry)
        self._mm: Optional[np.memmap] = None

    def _entry(self, name: str, entry: object) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{where}: bad header entry")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise SafetensorsError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SafetensorsError(f"{where}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise SafetensorsError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] out of range "
                                   f"(data area is {self.data_size} bytes; truncated file?)")
        count = 1
        for d in shape:
            count *= d
        if count * _DTYPES[dtype][1] != end - begin:
            raise SafetensorsError(f"{where}: {dtype}{shape} needs "
                                   f"{count * _DTYPES[dtype][1]} bytes, offsets give "
                                   f"{end - begin}")
        return TensorInfo(name, dtype, tuple(shape), begin, end)

    def keys(self) -> List[str]:
        return list(self.tensors)

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (BF16 as uint16), memory-mapped."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if info.end == info.begin:
            return np.zeros(info.shape, dtype=_DTYPES[info.dtype][0])
        mm = self._map()
        start = self.data_start + info.begin
        buf = mm[start:self.data_start + info.end]
        return buf.view(_DTYPES[info.dtype][0]).reshape(info.shape)

    def get(self, name: str, dtype: np.dtype = np.float32) -> np.ndarray:
        """A float tensor as a float32 (or given float dtype) array.

        F32 comes back memory-mapped when dtype is float32; F16/BF16 are
        converted. Raises SafetensorsError for a non-float dtype.
        """
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if info.dtype not in FLOAT_DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {info.dtype}, "
                                   f"expected one of {', '.join(FLOAT_DTYPES)}")
        arr = self.raw(name)
        if info.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if arr.dtype != dtype:
            arr = arr.astype(dtype)
        return arr


def load(path: str, dtype: np.dtype = np.float32) -> Dict[str, np.ndarray]:
    """Every float tensor of a file, as arrays of dtype."""
    f = SafeFile(path)
    return {name: f.get(name, dtype) for name in f.keys()}


def save(path: str, tensors: Mapping[str, np.ndarray], dtypes: Optional[Mapping[str, str]] = None,
         metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write tensors (float arrays) to path, atomically.

    dtypes maps a name to "F32", "F16" or "BF16" (default F32). BF16 is
    rounded to nearest even. Tensors are written in name order, 8-byte
    aligned as the reference writer does.
    """
    header: Dict[str, object] = {}
    blobs: List[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        kind = (dtypes or {}).get(name, "F32")
        if kind == "F32":
            data = arr.astype("<f4").tobytes()
        elif kind == "F16":
            data = arr.astype("<f2").tobytes()
        elif kind == "BF16":
            bits = arr.astype(np.float32).view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            data = rounded.astype("<u2").tobytes()
        else:
            raise ValueError(f"cannot write dtype {kind}")
        header[name] = {"dtype": kind, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for blob in blobs:
            fh.write(blob)
    os.replace(tmp, path)


class ShardedWeights(Mapping[str, np.ndarray]):
    """A read-only mapping over one or more safetensors files (a model's
    ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``); tensors are read on access."""

    def __init__(self, files: List[str]) -> None:
        self.files = [SafeFile(p) for p in files]
        self._where: Dict[str, SafeFile] = {}
        for f in self.files:
            for name in f.keys():
                self._where[name] = f

    def __getitem__(self, name: str) -> np.ndarray:
        f = self._where.get(name)
        if f is None:
            raise KeyError(name)
        return f.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def dtype_of(self, name: str) -> str:
        return self._where[name].tensors[name].dtype


def open_model_weights(model_dir: str) -> ShardedWeights:
    """The weights of a Hugging Face model folder: ``model.safetensors``, or
    the shards listed in ``model.safetensors.index.json`` (``weight_map``)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SafetensorsError(f"{index}: bad index ({exc})") from None
        return ShardedWeights([os.path.join(model_dir, f) for f in files])
    if os.path.exists(single):
        return ShardedWeights([single])
    raise SafetensorsError(f"{model_dir}: no model.safetensors (or index) found")

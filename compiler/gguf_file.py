"""Stage 1 — read the GGUF file (memory-mapped with the `gguf` package) and check it is whole.

Everything later reads tensors through `GGUFModel`, so a truncated or corrupt file fails here with a one-line reason
instead of deep inside packing.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


# GGUF value types (gguf.GGUFValueType) -> byte size of one scalar; 8 = STRING, 9 = ARRAY
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_layout(path: Path, size: int):
    """Walk the header with bounds checks before gguf.GGUFReader parses it. The reader trusts every count: a corrupt
    array length makes it loop (and allocate a list entry) for up to 2^64 elements past the end of the file instead of
    failing, so a flipped byte would hang the compiler. Here every length is checked against the bytes left."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        def fail(what: str, off: int, n: int):
            raise GGUFError(f"{path}: truncated or corrupt GGUF: {what} at byte {off} needs {n} bytes "
                            f"but the file has {size}")

        if size < 24:
            fail("the header", 0, 24)
        e = ">" if struct.unpack_from("<I", mm, 4)[0] & 0xFFFF == 0 else "<"   # big-endian files exist
        n_tensors, n_kv = struct.unpack_from(e + "QQ", mm, 8)
        u32, u64, u32u64 = struct.Struct(e + "I"), struct.Struct(e + "Q"), struct.Struct(e + "IQ")
        off = 24
        if n_kv * 13 > size - off:          # smallest entry: empty key (8) + type (4) + one byte
            fail(f"{n_kv} metadata entries", off, n_kv * 13)

        def string(off: int, what: str) -> int:
            if off + 8 > size:
                fail(what, off, 8)
            n = u64.unpack_from(mm, off)[0]
            if off + 8 + n > size:
                fail(what, off, 8 + n)
            return off + 8 + n

        def value(t: int, off: int, key: str, depth: int = 0) -> int:
            if t in _SCALAR_BYTES:
                if off + _SCALAR_BYTES[t] > size:
                    fail(f"metadata {key}", off, _SCALAR_BYTES[t])
                return off + _SCALAR_BYTES[t]
            if t == _STRING:
                return string(off, f"metadata {key}")
            if t != _ARRAY or depth > 4:
                raise GGUFError(f"{path}: corrupt GGUF: metadata {key} has unknown value type {t} (byte {off - 4})")
            if off + 12 > size:
                fail(f"metadata {key}", off, 12)
            it, count = u32u64.unpack_from(mm, off)
            off += 12
            item = _SCALAR_BYTES.get(it, 8 if it == _STRING else 12)
            if count * item > size - off:
                fail(f"metadata {key} ({count} items)", off, count * item)
            if it in _SCALAR_BYTES:
                return off + count * item
            if it == _STRING:
                for _ in range(count):
                    off = string(off, f"metadata {key}")
                return off
            for _ in range(count):
                off = value(it, off, key, depth + 1)
            return off

        for i in range(n_kv):
            end = string(off, f"metadata key #{i}")
            key = mm[off + 8:end].decode("utf-8", "replace")
            if end + 4 > size:
                fail(f"metadata {key}", end, 4)
            off = value(u32.unpack_from(mm, end)[0], end + 4, key)
        if n_tensors * 24 > size - off:      # smallest tensor info: empty name, no dims, type, offset
            fail(f"{n_tensors} tensor infos", off, n_tensors * 24)
        for i in range(n_tensors):
            end = string(off, f"tensor info #{i}")
            if end + 4 > size:
                fail(f"tensor info #{i}", end, 4)
            n_dims = u32.unpack_from(mm, end)[0]
            if n_dims > 8:
                raise GGUFError(f"{path}: corrupt GGUF: tensor info #{i} has {n_dims} dimensions (byte {end})")
            off = end + 4 + 8 * n_dims + 12
            if off > size:
                fail(f"tensor info #{i}", end, off - end)


@dataclass
class TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]   # numpy order: (rows, K) for a matrix, (n,) for a vector
    n_bytes: int
    data: np.ndarray         # raw bytes (uint8 memmap view)


class GGUFModel:
    """A GGUF file: metadata fields and tensors by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: not a file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        check_layout(self.path, size)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on damaged headers,
            # and on tensor data cut short (it maps every tensor while parsing)
            raise GGUFError(f"{self.path}: corrupt or truncated GGUF file of {size} bytes "
                            f"({type(e).__name__}: {_first_line(e)})") from None
        for f in self.reader.fields.values():   # decode every field now (~0.1 s): bad UTF-8 fails here, by name
            try:
                f.contents()
            except Exception as e:
                raise GGUFError(f"{self.path}: metadata field {f.name} is corrupt ({_first_line(e)})") from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise GGUFError(f"{self.path}: truncated: tensor {t.name} ends at byte {end} but the file has {size}")
            raw = np.asarray(self.reader.data[t.data_offset:end])
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, t.tensor_type, shape, int(t.n_bytes), raw)
        self.file_bytes = size

    def get(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: metadata field {key} is corrupt ({_first_line(e)})") from None

    def require(self, key: str):
        v = self.get(key)
        if v is None:
            raise GGUFError(f"{self.path}: metadata field {key} is missing")
        return v

    @property
    def arch(self) -> str:
        return str(self.require("general.architecture"))

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name} is missing")
        return self.tensors[name]

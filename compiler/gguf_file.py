"""Stage 1 — read the GGUF file (memory-mapped with the `gguf` package) and check it is whole.

Everything later reads tensors through `GGUFModel`, so a truncated or corrupt file fails here with a one-line reason
instead of deep inside packing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"


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
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on damaged headers
            raise GGUFError(f"{self.path}: corrupt or truncated GGUF header ({type(e).__name__}: {e})") from None
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
            raise GGUFError(f"{self.path}: metadata field {key} is corrupt ({e})") from None

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

"""Stage 6 — write weight shards.

Shard file format (version 1): raw little-endian u32 words, nothing else. Parts are appended in schedule order, each
starting at a multiple of PART_ALIGN bytes (zero padding between), and no shard exceeds SHARD_BYTES. The manifest holds
each shard's size and sha256 and each part's (shard, offset, bytes), so a loader verifies a shard before using it and
uploads each part as its own GPU buffer straight from the shard bytes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .pack import SHARD_BYTES

PART_ALIGN = 256


class ShardWriter:
    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES):
        self.out_dir, self.shard_bytes = Path(out_dir), shard_bytes
        self.shards: list[dict] = []
        self._f = None
        self._hash = None
        self._size = 0

    def _open(self):
        self._close()
        name = f"shard-{len(self.shards):03d}.bin"
        self._f = open(self.out_dir / name, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self.shards.append({"file": name})

    def _close(self):
        if self._f:
            self._f.close()
            self.shards[-1].update(bytes=self._size, sha256=self._hash.hexdigest())
            self._f = None

    def _write(self, b: bytes):
        self._f.write(b)
        self._hash.update(b)
        self._size += len(b)

    def add(self, words: np.ndarray) -> dict:
        """Appends one part; returns its location {"shard", "offset", "bytes"}."""
        data = np.ascontiguousarray(words, dtype=np.uint32).tobytes()
        pad = -self._size % PART_ALIGN
        if self._f is None or self._size + pad + len(data) > self.shard_bytes:
            self._open()
            pad = 0
        self._write(b"\0" * pad)
        loc = {"shard": len(self.shards) - 1, "offset": self._size, "bytes": len(data)}
        self._write(data)
        return loc

    def finish(self) -> list[dict]:
        self._close()
        return self.shards

"""Stage 6 — pack + shards: every weight part the programs bind is packed (pack.py) and appended to a shard file.

Shard file format (version 1): raw little-endian u32 words, nothing else. Parts are appended in schedule order (the
order the programs first bind each weight; all parts of a weight together), each
starting at a multiple of PART_ALIGN bytes (zero padding between), and no shard exceeds SHARD_BYTES. The manifest holds
each shard's size and sha256 and each part's (shard, offset, bytes), so a loader verifies a shard before using it and
uploads each part as its own GPU buffer straight from the shard bytes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .gguf_file import GGUFModel
from .ir import PART_ALIGN, SHARD_BYTES, Program
from .pack import packed_parts
from .plan import WeightPlan


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


def used_weights(programs: dict[str, Program]) -> list[str]:
    """Weight names in the order the programs first bind them ("tensor#part" refs; activations have no '#')."""
    seen: dict[str, None] = {}
    for prog in programs.values():
        for step in prog.steps:
            for ref in step.bind:
                if "#" in ref:
                    seen.setdefault(ref.rsplit("#", 1)[0], None)
    return list(seen)


def write_shards(m: GGUFModel, plan: WeightPlan, programs: dict[str, Program], out_dir: Path,
                 shard_bytes: int = SHARD_BYTES, progress=None) -> tuple[dict, list[dict]]:
    """Packs and writes every weight the programs use. Returns (manifest `weights`, manifest `shards`).
    progress: optional callable(done_parts, total_parts)."""
    names = used_weights(programs)
    writer = ShardWriter(out_dir, shard_bytes)
    total = sum(len(plan(n).parts) for n in names)
    weights, done = {}, 0
    for name in names:
        ref, parts = plan(name), []
        for i, words in packed_parts(m, plan, name):
            row0, rows = ref.parts[i]
            parts.append({"row0": row0, "rows": rows, **writer.add(words)})
            done += 1
            if progress:
                progress(done, total)
        weights[name] = {"quant": ref.quant, "shape": [ref.rows, ref.k], "parts": parts}
    return weights, writer.finish()

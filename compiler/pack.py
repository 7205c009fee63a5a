"""Stage 3 — pack weights: GGUF tensors (and a few computed constants) into GPU parts.

Every tensor the schedule asks for becomes one or more *parts*: consecutive row ranges whose packed bytes each fit in
one shard (<= SHARD_BYTES, which is also below the 128 MiB storage-binding limit every WebGPU adapter grants). A split
tensor is invisible to kernels: the schedule runs a kernel once per part with the part's row offset.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .gguf_file import GGUFModel
from .quant import F32, QuantScheme, scheme_for
from .schedule import WeightRef

SHARD_BYTES = 64 << 20   # max bytes per shard file and per part (browser-friendly downloads, < any binding limit)


def rope_inv_freq(base: float, dim: int) -> np.ndarray:
    """(dim/2,) f32 — as transformers computes it: 1 / base ** (arange(0, dim, 2) / dim), in float32."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)


class WeightPacker:
    """Resolves tensor names to WeightRefs for the schedule, and packs them for the shard writer."""

    def __init__(self, m: GGUFModel, cfg: ModelConfig, max_part_bytes: int = SHARD_BYTES):
        self.m, self.cfg, self.max_part_bytes = m, cfg, max_part_bytes
        self.refs: dict[str, WeightRef] = {}
        self._constants = {"rope_inv_freq": rope_inv_freq(cfg.rope_base, cfg.rope_dim)}
        if cfg.rope_base_local:
            self._constants["rope_inv_freq_local"] = rope_inv_freq(cfg.rope_base_local, cfg.rope_dim)

    def _source(self, name: str) -> tuple[type[QuantScheme], int, int, np.ndarray]:
        if name in self._constants:
            a = self._constants[name]
            return F32, 1, a.size, a.view(np.uint8)
        t = self.m.tensor(name)
        rows, k = (1, t.shape[0]) if len(t.shape) == 1 else (t.shape[0], t.shape[1])
        return scheme_for(t.ggml_type), rows, k, t.data

    def __call__(self, name: str) -> WeightRef:
        if name not in self.refs:
            scheme, rows, k, _ = self._source(name)
            row_bytes = scheme.packed_words(1, k) * 4
            per_part = max(1, self.max_part_bytes // row_bytes)
            parts = [(r0, min(per_part, rows - r0)) for r0 in range(0, rows, per_part)]
            self.refs[name] = WeightRef(name, scheme.name, rows, k, parts)
        return self.refs[name]

    def packed_parts(self, name: str):
        """Yields (part index, packed u32 words) for a tensor, one part at a time (bounded memory)."""
        scheme, rows, k, raw = self._source(name)
        ref = self(name)
        row_bytes = raw.size // rows
        for i, (row0, n) in enumerate(ref.parts):
            yield i, scheme.pack(raw[row0 * row_bytes:(row0 + n) * row_bytes], n, k)

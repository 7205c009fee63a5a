"""Stage 3 — pack weights: GGUF tensors (and a few computed constants) into GPU parts.

Every tensor the schedule asks for becomes one or more *parts*: consecutive row ranges whose packed bytes each fit in
one shard (<= SHARD_BYTES, which is also below the 128 MiB storage-binding limit every WebGPU adapter grants). A split
tensor is invisible to kernels: the schedule runs a kernel once per part with the part's row offset.

With `requant` (a scheme name, `kiln compile --quant`), every F32 / F16 / Q8_0 matrix (2-D; never norms or other 1-D
tensors) is dequantized with gguf.quants.dequantize and re-quantized into that scheme; other types stay as they are.
"""
from __future__ import annotations

import numpy as np
from gguf.quants import dequantize

from .config import ModelConfig
from .gguf_file import GGUFModel
from .quant import F32, REQUANT_SOURCES, QuantScheme, requant_scheme, requantize, scheme_for
from .schedule import WeightRef

SHARD_BYTES = 64 << 20   # max bytes per shard file and per part (browser-friendly downloads, < any binding limit)


def rope_inv_freq(base: float, dim: int) -> np.ndarray:
    """(dim/2,) f32 — as transformers computes it: 1 / base ** (arange(0, dim, 2) / dim), in float32."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)


class WeightPacker:
    """Resolves tensor names to WeightRefs for the schedule, and packs them for the shard writer."""

    def __init__(self, m: GGUFModel, cfg: ModelConfig, max_part_bytes: int = SHARD_BYTES, requant: str | None = None):
        self.m, self.cfg, self.max_part_bytes = m, cfg, max_part_bytes
        self.requant = requant_scheme(requant) if requant else None
        self.refs: dict[str, WeightRef] = {}
        self._constants = {"rope_inv_freq": rope_inv_freq(cfg.rope_base, cfg.rope_dim)}
        if cfg.rope_base_local:
            self._constants["rope_inv_freq_local"] = rope_inv_freq(cfg.rope_base_local, cfg.rope_dim)

    def _source(self, name: str) -> tuple[type[QuantScheme], int, int, np.ndarray]:
        """(source scheme, rows, K, raw bytes as stored in the GGUF)."""
        if name in self._constants:
            a = self._constants[name]
            return F32, 1, a.size, a.view(np.uint8)
        t = self.m.tensor(name)
        rows, k = (1, t.shape[0]) if len(t.shape) == 1 else (t.shape[0], t.shape[1])
        return scheme_for(t.ggml_type), rows, k, t.data

    def target(self, ggml_type, ndim: int) -> type[QuantScheme]:
        """The scheme a tensor of this type and rank is packed as."""
        if self.requant and ndim == 2 and ggml_type in REQUANT_SOURCES:
            return self.requant
        return scheme_for(ggml_type)

    def __call__(self, name: str) -> WeightRef:
        if name not in self.refs:
            scheme, rows, k = self._shape(name)
            row_bytes = scheme.packed_words(1, k) * 4
            per_part = max(1, self.max_part_bytes // row_bytes)
            parts = [(r0, min(per_part, rows - r0)) for r0 in range(0, rows, per_part)]
            self.refs[name] = WeightRef(name, scheme.name, rows, k, parts)
        return self.refs[name]

    def _shape(self, name: str) -> tuple[type[QuantScheme], int, int]:
        """(packed scheme, rows, K): what the tensor becomes, without reading or re-quantizing its data."""
        if name in self._constants:
            return F32, 1, self._constants[name].size
        t = self.m.tensor(name)
        rows, k = (1, t.shape[0]) if len(t.shape) == 1 else (t.shape[0], t.shape[1])
        return self.target(t.ggml_type, len(t.shape)), rows, k

    def packed_parts(self, name: str):
        """Yields (part index, packed u32 words) for a tensor, one part at a time (bounded memory)."""
        src, rows, k, raw = self._source(name)
        scheme, _, _ = self._shape(name)
        ref = self(name)
        row_bytes = raw.size // rows
        for i, (row0, n) in enumerate(ref.parts):
            part = raw[row0 * row_bytes:(row0 + n) * row_bytes]
            if scheme is not src:   # re-quantize this part's rows (one part at a time: bounded memory)
                floats = dequantize(np.asarray(part).reshape(n, row_bytes), src.ggml_type).reshape(n, k)
                part = requantize(scheme, floats)
            yield i, scheme.pack(part, n, k)


def tensor_types(m: GGUFModel, requant: str | None = None) -> dict[str, tuple[str, int]]:
    """{tensor: (type, bytes)} as the GPU will hold it (`kiln inspect --quant`): GGUF type names (Q8_0, ...) for
    tensors kept as they are, the scheme name in capitals (Q8_0, Q4G32, ...) for re-quantized ones."""
    scheme = requant_scheme(requant) if requant else None
    out = {}
    for name, t in m.tensors.items():
        if scheme and len(t.shape) == 2 and t.ggml_type in REQUANT_SOURCES:
            out[name] = (scheme.name.upper(), scheme.packed_words(t.shape[0], t.shape[1]) * 4)
        else:
            out[name] = (t.ggml_type.name, t.n_bytes)
    return out

"""Stage 3 — quantization schemes: how each GGUF block type is repacked for the GPU.

GGUF stores a quantized row as a run of blocks, each block = small header (f16 scale, maybe a min / high bits) followed by
packed integers. Many block sizes (Q4_0: 18 bytes, Q8_0: 34 bytes) are not multiples of 4, and WGSL can only read u32, so
every scheme here repacks a (rows, K) matrix *without changing a single bit of information* into a planar, u32-aligned
layout: the same bytes, grouped by kind, region after region:

    region 0: packed integers   (rows * n_blocks, words_per_block) u32   -- the block's `qs` bytes, unchanged
    region 1: extras            e.g. Q5_0's high bits, one u32 per block
    region last: scales         f16 scales/mins, two f16 per u32 (`unpack2x16float` in WGSL, no shader-f16 needed)

Region offsets are functions of (rows, K) alone, so a kernel computes them from its uniforms; nothing else is stored.
The packed size equals the GGUF size up to a few bytes of u32 padding: the GPU holds exactly the quantized weights,
and the kernels dequantize 32 values at a time in registers (`load_group` in `shaders/_quant_<name>.wgsl.j2`).

Each scheme also has `dequantize_packed`, a numpy reading of its own packed layout. Tests compare it bit-exactly with
`gguf.quants.dequantize` on the original blocks, so the layout documented here is the layout the kernels read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as T

from .errors import UnsupportedModelError

GROUP = 32  # every kernel consumes weights 32 at a time; K must be a multiple of 32


def _f16_pairs(h: np.ndarray) -> np.ndarray:
    """(n,) f16 bit patterns (u16) -> (ceil(n/2),) u32, element 2i in the low half (what unpack2x16float reads)."""
    h = np.ascontiguousarray(h, dtype=np.uint16).reshape(-1)
    if h.size % 2:
        h = np.concatenate([h, np.zeros(1, np.uint16)])
    return h.view(np.uint32)


def _u32(b: np.ndarray) -> np.ndarray:
    """(..., 4k) uint8 -> (..., k) u32 little-endian, flattened."""
    return np.ascontiguousarray(b).reshape(-1).view(np.uint32)


@dataclass(frozen=True)
class QuantScheme:
    """A GGUF tensor type as the GPU sees it. Subclasses register themselves by `name`."""
    name: ClassVar[str]
    ggml_type: ClassVar[T]
    block_size: ClassVar[int]       # elements per GGUF block
    block_bytes: ClassVar[int]      # bytes per GGUF block

    registry: ClassVar[dict[str, type["QuantScheme"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        QuantScheme.registry[cls.name] = cls

    @classmethod
    def blocks(cls, raw: np.ndarray, rows: int, k: int) -> np.ndarray:
        """Raw GGUF bytes of a (rows, K) tensor -> (rows * K / block_size, block_bytes) uint8."""
        if k % GROUP:
            raise UnsupportedModelError(f"row length {k} is not a multiple of {GROUP}")
        return np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows * (k // cls.block_size), cls.block_bytes)

    @classmethod
    def pack(cls, raw: np.ndarray, rows: int, k: int) -> np.ndarray:
        """GGUF bytes -> planar u32 words (the GPU buffer)."""

    @classmethod
    def dequantize_packed(cls, packed: np.ndarray, rows: int, k: int) -> np.ndarray:
        """Numpy reading of the packed layout -> (rows, K) float32; the kernels' reference."""

    @classmethod
    def packed_words(cls, rows: int, k: int) -> int:
        return int(cls.pack(np.zeros(rows * k // cls.block_size * cls.block_bytes, np.uint8), rows, k).size)


def _scales_from(packed: np.ndarray, start: int, n: int) -> np.ndarray:
    return packed[start:].view(np.uint16)[:n].view(np.float16).astype(np.float32)


class F32(QuantScheme):
    name, ggml_type, block_size, block_bytes = "f32", T.F32, 1, 4

    @classmethod
    def pack(cls, raw, rows, k):
        return np.ascontiguousarray(raw).reshape(-1).view(np.uint32).copy()

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        return packed.view(np.float32).reshape(rows, k).copy()


class F16(QuantScheme):
    # (rows, K) halves, two per u32; K is a multiple of 32 so rows never share a word.
    name, ggml_type, block_size, block_bytes = "f16", T.F16, 1, 2

    @classmethod
    def pack(cls, raw, rows, k):
        return _f16_pairs(np.ascontiguousarray(raw).reshape(-1).view(np.uint16)).copy()

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        return packed.view(np.float16).astype(np.float32).reshape(rows, k)


class Q8_0(QuantScheme):
    # block: d f16 | qs int8[32]          value = d * q
    # packed: qs (nb, 8) u32 | d (nb) f16 pairs
    name, ggml_type, block_size, block_bytes = "q8_0", T.Q8_0, 32, 34

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 2:]), _f16_pairs(b[:, :2].copy().view(np.uint16))])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = rows * k // 32
        q = packed[: nb * 8].view(np.int8).reshape(nb, 32).astype(np.float32)
        d = _scales_from(packed, nb * 8, nb)
        return (q * d[:, None]).reshape(rows, k)


class Q4_0(QuantScheme):
    # block: d f16 | qs u8[16]; element j < 16 is the low nibble of qs[j], element j+16 the high nibble; value = d*(q-8)
    # packed: qs (nb, 4) u32 | d (nb) f16 pairs
    name, ggml_type, block_size, block_bytes = "q4_0", T.Q4_0, 32, 18

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 2:]), _f16_pairs(b[:, :2].copy().view(np.uint16))])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = rows * k // 32
        qs = packed[: nb * 4].view(np.uint8).reshape(nb, 16)
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - 8
        return (q * _scales_from(packed, nb * 4, nb)[:, None]).reshape(rows, k)


class Q4_1(QuantScheme):
    # block: d f16 | m f16 | qs u8[16]; nibbles as Q4_0; value = d*q + m
    # packed: qs (nb, 4) u32 | (d, m) (nb) u32 -- the block header is already one aligned word
    name, ggml_type, block_size, block_bytes = "q4_1", T.Q4_1, 32, 20

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 4:]), _u32(b[:, :4])])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = rows * k // 32
        qs = packed[: nb * 4].view(np.uint8).reshape(nb, 16)
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
        dm = packed[nb * 4: nb * 5].view(np.float16).astype(np.float32).reshape(nb, 2)
        return (q * dm[:, :1] + dm[:, 1:]).reshape(rows, k)


class Q5_0(QuantScheme):
    # block: d f16 | qh u32 (bit j = 5th bit of element j) | qs u8[16] (nibbles as Q4_0); value = d*(q-16)
    # packed: qs (nb, 4) u32 | qh (nb) u32 | d (nb) f16 pairs
    name, ggml_type, block_size, block_bytes = "q5_0", T.Q5_0, 32, 22

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 6:]), _u32(b[:, 2:6]), _f16_pairs(b[:, :2].copy().view(np.uint16))])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = rows * k // 32
        qs = packed[: nb * 4].view(np.uint8).reshape(nb, 16)
        qh = packed[nb * 4: nb * 5]
        hi = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        q = np.concatenate([qs & 15, qs >> 4], axis=1) | hi
        return ((q.astype(np.float32) - 16) * _scales_from(packed, nb * 5, nb)[:, None]).reshape(rows, k)


def scheme_for(ggml_type: T) -> type[QuantScheme]:
    for s in QuantScheme.registry.values():
        if s.ggml_type == ggml_type:
            return s
    supported = ", ".join(sorted(s.ggml_type.name for s in QuantScheme.registry.values()))
    raise UnsupportedModelError(f"tensor type {ggml_type.name} is not supported (supported: {supported})")

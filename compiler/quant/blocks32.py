"""Unquantized types and GGUF's 32-element block types (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL).

Each class states its GGUF block, then its packed regions (see scheme.py); nb = rows * K / 32 blocks.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .scheme import QuantScheme, Region, halves_from


class F32(QuantScheme):
    # (rows, K) f32, row-major: one "block" per element
    name, ggml_type, block_size, block_bytes = "f32", T.F32, 1, 4
    regions = (Region("v", 0, 4),)

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        return packed.view(np.float32).reshape(rows, k).copy()


class F16(QuantScheme):
    # (rows, K) halves, two per u32; K is a multiple of 32 so rows never share a word.
    name, ggml_type, block_size, block_bytes = "f16", T.F16, 1, 2
    regions = (Region("v", 0, 2, halves=True),)

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        return packed.view(np.float16).astype(np.float32).reshape(rows, k)


class BF16(QuantScheme):
    # (rows, K) bfloat16 (the top half of an f32), two per u32, low half first; K is a multiple of 32
    name, ggml_type, block_size, block_bytes = "bf16", T.BF16, 1, 2
    regions = (Region("v", 0, 2, halves=True),)   # 16-bit pairs (the packing of f16 halves; read as bf16)

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        h = packed.view(np.uint16)[: rows * k].astype(np.uint32) << 16
        return h.view(np.float32).reshape(rows, k).copy()


class Q8_0(QuantScheme):
    # block: d f16 | qs int8[32]          value = d * q
    name, ggml_type, block_size, block_bytes = "q8_0", T.Q8_0, 32, 34
    regions = (Region("qs", 2, 34), Region("d", 0, 2, halves=True))   # qs (nb, 8) u32 | d (nb) f16 pairs

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = cls.n_blocks(rows, k)
        q = packed[: nb * 8].view(np.int8).reshape(nb, 32).astype(np.float32)
        d = halves_from(packed, cls.offset("d", nb), nb)
        return (q * d[:, None]).reshape(rows, k)


def _nibbles32(packed: np.ndarray, nb: int) -> np.ndarray:
    """qs (nb, 4) u32 -> (nb, 32) uint8: element j < 16 is the low nibble of byte j, element j+16 the high nibble."""
    qs = packed[: nb * 4].view(np.uint8).reshape(nb, 16)
    return np.concatenate([qs & 15, qs >> 4], axis=1)


class Q4_0(QuantScheme):
    # block: d f16 | qs u8[16]; element j < 16 is the low nibble of qs[j], element j+16 the high nibble; value = d*(q-8)
    name, ggml_type, block_size, block_bytes = "q4_0", T.Q4_0, 32, 18
    regions = (Region("qs", 2, 18), Region("d", 0, 2, halves=True))   # qs (nb, 4) u32 | d (nb) f16 pairs

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = cls.n_blocks(rows, k)
        q = _nibbles32(packed, nb).astype(np.float32) - 8
        return (q * halves_from(packed, cls.offset("d", nb), nb)[:, None]).reshape(rows, k)


class Q4_1(QuantScheme):
    # block: d f16 | m f16 | qs u8[16]; nibbles as Q4_0; value = d*q + m
    name, ggml_type, block_size, block_bytes = "q4_1", T.Q4_1, 32, 20
    regions = (Region("qs", 4, 20), Region("dm", 0, 4))   # qs (nb, 4) u32 | (d, m) (nb) u32: already one aligned word

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = cls.n_blocks(rows, k)
        q = _nibbles32(packed, nb).astype(np.float32)
        at = cls.offset("dm", nb)
        dm = packed[at: at + nb].view(np.float16).astype(np.float32).reshape(nb, 2)
        return (q * dm[:, :1] + dm[:, 1:]).reshape(rows, k)


class Q5_0(QuantScheme):
    # block: d f16 | qh u32 (bit j = 5th bit of element j) | qs u8[16] (nibbles as Q4_0); value = d*(q-16)
    name, ggml_type, block_size, block_bytes = "q5_0", T.Q5_0, 32, 22
    regions = (Region("qs", 6, 22), Region("qh", 2, 6), Region("d", 0, 2, halves=True))  # qs (nb,4) | qh (nb) | d

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = cls.n_blocks(rows, k)
        at = cls.offset("qh", nb)
        qh = packed[at: at + nb]
        hi = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        q = _nibbles32(packed, nb) | hi
        return ((q.astype(np.float32) - 16) * halves_from(packed, cls.offset("d", nb), nb)[:, None]).reshape(rows, k)


class Q5_1(QuantScheme):
    # block: d f16 | m f16 | qh u32 (bit j = 5th bit of element j) | qs u8[16] (nibbles as Q4_0); value = d*q + m
    name, ggml_type, block_size, block_bytes = "q5_1", T.Q5_1, 32, 24
    regions = (Region("qs", 8, 24), Region("qh", 4, 8), Region("dm", 0, 4))   # qs (nb, 4) | qh (nb) | (d, m) (nb)

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = cls.n_blocks(rows, k)
        at = cls.offset("qh", nb)
        qh = packed[at: at + nb]
        hi = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        q = (_nibbles32(packed, nb) | hi).astype(np.float32)
        at = cls.offset("dm", nb)
        dm = packed[at: at + nb].view(np.float16).astype(np.float32).reshape(nb, 2)
        return (q * dm[:, :1] + dm[:, 1:]).reshape(rows, k)


class IQ4_NL(QuantScheme):
    # block: d f16 | qs u8[16] (nibbles as Q4_0); value = d * KVALUES[q], a fixed non-linear 16-entry int8 table
    name, ggml_type, block_size, block_bytes = "iq4_nl", T.IQ4_NL, 32, 18
    regions = (Region("qs", 2, 18), Region("d", 0, 2, halves=True))   # qs (nb, 4) u32 | d (nb) f16 pairs
    KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)   # llama.cpp kvalues_iq4nl

    @classmethod
    def layout(cls) -> dict:
        """+ the table as 4 u32 words (entry i = byte i % 4 of word i / 4), which the reader selects from."""
        words = np.array(cls.KVALUES, np.int8).view(np.uint32)
        return {**super().layout(), "table": [f"0x{int(w):08x}u" for w in words]}

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb = cls.n_blocks(rows, k)
        q = np.array(cls.KVALUES, np.float32)[_nibbles32(packed, nb)]
        return (q * halves_from(packed, cls.offset("d", nb), nb)[:, None]).reshape(rows, k)

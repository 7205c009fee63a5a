"""GGUF's k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): 256-element super-blocks.

A super-block holds 8 groups of 32 (kernels still consume 32 at a time): group j of super-block sb is global group
8 * sb + j, so for a row-major (rows, K) tensor group g of row r lives in super-block (r * K/32 + g) // 8.
Each scheme lists its GGUF block, then declares its packed regions in order (see scheme.py); `nsb` = rows * K / 256.
In the dequantize_packed readings, arrays are shaped (nsb, 8 groups, 32) so the group structure is visible; the
float operations happen in the same order as gguf.quants (so the comparison is bit-exact) and as the shaders.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .scheme import QuantScheme, Region, halves_from

QK_K = 256


class _KQuant(QuantScheme):
    block_size = QK_K

    @classmethod
    def region_bytes(cls, packed: np.ndarray, region: str, nsb: int) -> np.ndarray:
        """A whole-word region -> (nsb, bytes per super-block) uint8."""
        r = next(r for r in cls.regions if r.name == region)
        start = cls.offset(region, nsb)
        return packed[start: start + nsb * r.words].view(np.uint8).reshape(nsb, 4 * r.words)

    @classmethod
    def d_dmin(cls, packed: np.ndarray, nsb: int) -> np.ndarray:
        """The (d, dmin) word of each super-block -> (nsb, 2) float32."""
        return cls.region_bytes(packed, "dm", nsb).view(np.float16).astype(np.float32)


def _k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12 scale bytes (nsb, 12) -> 6-bit (scale, min) of the 8 groups, each (nsb, 8) float32.
    ggml's get_scale_min_k4: group j < 4: sc = s[j] & 63, m = s[j+4] & 63;
    j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4,  m = (s[j+4] >> 4) | (s[j] >> 6) << 4."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(nsb, 128) bytes as 4 runs of 32 -> (nsb, 8, 32): group 2c = low nibbles of run c, group 2c+1 = high nibbles."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """(nsb, 64) bytes as 2 runs of 32 -> (nsb, 8, 32) 2-bit values: group 4h + s = bits 2s..2s+1 of run h."""
    sh = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> sh) & 3).reshape(-1, 8, 32)


def _bit_planes(qh: np.ndarray) -> np.ndarray:
    """(nsb, 32) bytes -> (nsb, 8, 32): group j = bit j of byte l for element l."""
    return (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1


class Q4_K(_KQuant):
    # block (144 B): d f16 | dmin f16 | scales u8[12] (8 x 6-bit scale, 8 x 6-bit min) | qs u8[128]
    #   group j: run c = j // 2 of qs (32 bytes), low nibbles for even j, high for odd;
    #   value = (d * sc[j]) * q - (dmin * m[j])
    name, ggml_type, block_bytes = "q4_k", T.Q4_K, 144
    regions = (Region("qs", 16, 144), Region("scales", 4, 16), Region("dm", 0, 4))   # 36 words, exactly the block

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        q = _nibbles(cls.region_bytes(packed, "qs", nsb)).astype(np.float32)
        sc, m = _k4_scale_min(cls.region_bytes(packed, "scales", nsb))
        dm = cls.d_dmin(packed, nsb)
        d, mn = (dm[:, :1] * sc)[:, :, None], (dm[:, 1:] * m)[:, :, None]
        return (d * q - mn).reshape(rows, k)


class Q5_K(_KQuant):
    # block (176 B): d f16 | dmin f16 | scales u8[12] (as Q4_K) | qh u8[32] | qs u8[128] (as Q4_K)
    #   bit j of qh[l] is bit 4 of element l of group j; value = (d * sc[j]) * q - (dmin * m[j])
    name, ggml_type, block_bytes = "q5_k", T.Q5_K, 176
    regions = (Region("qs", 48, 176), Region("qh", 16, 48), Region("scales", 4, 16), Region("dm", 0, 4))   # 44 words

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        q = _nibbles(cls.region_bytes(packed, "qs", nsb)) | (_bit_planes(cls.region_bytes(packed, "qh", nsb)) << 4)
        sc, m = _k4_scale_min(cls.region_bytes(packed, "scales", nsb))
        dm = cls.d_dmin(packed, nsb)
        d, mn = (dm[:, :1] * sc)[:, :, None], (dm[:, 1:] * m)[:, :, None]
        return (d * q.astype(np.float32) - mn).reshape(rows, k)


class Q6_K(_KQuant):
    # block (210 B): ql u8[128] | qh u8[64] | scales i8[16] (one per 16 elements) | d f16
    #   group j = 4h + r (half h, quarter r): low 4 bits from ql[64h + 32(r % 2) + l], nibble r // 2;
    #   high 2 bits = bits 2r..2r+1 of qh[32h + l]; elements l < 16 use scales[2j], l >= 16 scales[2j + 1];
    #   value = (d * scale) * (q - 32)
    name, ggml_type, block_bytes = "q6_k", T.Q6_K, 210
    regions = (Region("ql", 0, 128), Region("qh", 128, 192), Region("scales", 192, 208),
               Region("d", 208, 210, halves=True))

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        ql = cls.region_bytes(packed, "ql", nsb).reshape(nsb, 2, 1, 2, 32)       # (half, nibble, run, l)
        lo = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(nsb, 2, 4, 32)   # r = 2 * nibble + run
        qh = cls.region_bytes(packed, "qh", nsb).reshape(nsb, 2, 1, 32)
        hi = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).reshape(nsb, 16, 16).astype(np.float32)
        sc = cls.region_bytes(packed, "scales", nsb).view(np.int8).astype(np.float32)
        d = halves_from(packed, cls.offset("d", nsb), nsb)
        return ((d[:, None] * sc)[:, :, None] * q).reshape(rows, k)


class Q2_K(_KQuant):
    # block (84 B): scales u8[16] (low nibble scale, high nibble min, one per 16 elements) | qs u8[64] | d f16 | dmin f16
    #   group j = 4h + s: bits 2s..2s+1 of qs[32h + l]; elements l < 16 use scales[2j], l >= 16 scales[2j + 1];
    #   value = (d * sc) * q - (dmin * m)
    name, ggml_type, block_bytes = "q2_k", T.Q2_K, 84
    regions = (Region("qs", 16, 80), Region("scales", 0, 16), Region("dm", 80, 84))   # 21 words, exactly the block

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        q = _crumbs(cls.region_bytes(packed, "qs", nsb)).reshape(nsb, 16, 16).astype(np.float32)
        s = cls.region_bytes(packed, "scales", nsb)
        dm = cls.d_dmin(packed, nsb)
        d = (dm[:, :1] * (s & 15).astype(np.float32))[:, :, None]
        mn = (dm[:, 1:] * (s >> 4).astype(np.float32))[:, :, None]
        return (d * q - mn).reshape(rows, k)


class Q3_K(_KQuant):
    # block (110 B): hmask u8[32] | qs u8[64] | scales u8[12] (16 x 6-bit) | d f16
    #   group j = 4h + s: low 2 bits = bits 2s..2s+1 of qs[32h + l]; bit j of hmask[l] SET means +0, CLEAR means -4;
    #   scale i (i = 2j + l // 16) = ((b[i % 8] >> 4 (i // 8)) & 15) | ((b[8 + i % 4] >> 2 (i // 4)) & 3) << 4, minus 32;
    #   value = (d * scale) * q
    name, ggml_type, block_bytes = "q3_k", T.Q3_K, 110
    regions = (Region("qs", 32, 96), Region("hmask", 0, 32), Region("scales", 96, 108),
               Region("d", 108, 110, halves=True))

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        hm = _bit_planes(cls.region_bytes(packed, "hmask", nsb))
        q = (_crumbs(cls.region_bytes(packed, "qs", nsb)).astype(np.int8) - ((hm ^ 1) << 2).astype(np.int8))
        b = cls.region_bytes(packed, "scales", nsb)
        i = np.arange(16)
        lo = (b[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 15
        hi = (b[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
        sc = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
        d = halves_from(packed, cls.offset("d", nsb), nsb)
        return ((d[:, None] * sc)[:, :, None] * q.reshape(nsb, 16, 16).astype(np.float32)).reshape(rows, k)

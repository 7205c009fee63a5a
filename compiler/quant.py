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
        if "ggml_type" in cls.__dict__:   # concrete schemes only (not shared bases like _KQuant)
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

# ---- k-quants: 256-element super-blocks ----------------------------------------------------------------------------
# A super-block holds 8 groups of 32 (kernels still consume 32 at a time): group j of super-block sb is global group
# 8 * sb + j, so for a row-major (rows, K) tensor group g of row r lives in super-block (r * K/32 + g) // 8.
# Each scheme below lists its GGUF block, then the packed regions in order; `nsb` = rows * K / 256 super-blocks.
# In the dequantize_packed readings, arrays are shaped (nsb, 8 groups, 32) so the group structure is visible; the
# float operations happen in the same order as gguf.quants (so the comparison is bit-exact) and as the shaders.
QK_K = 256


class _KQuant(QuantScheme):
    block_size = QK_K

    @classmethod
    def blocks(cls, raw, rows, k):
        if k % QK_K:
            raise UnsupportedModelError(f"{cls.ggml_type.name} row length {k} is not a multiple of {QK_K}")
        return super().blocks(raw, rows, k)


def _bytes(packed: np.ndarray, start: int, nsb: int, n: int) -> np.ndarray:
    """Region of n bytes per super-block starting at word `start` -> (nsb, n) uint8."""
    return packed[start: start + nsb * n // 4].view(np.uint8).reshape(nsb, n)


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
    # packed: qs (nsb, 32) u32 | scales (nsb, 3) u32 | (d, dmin) (nsb) u32   -- 36 words, exactly the block
    name, ggml_type, block_bytes = "q4_k", T.Q4_K, 144

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 16:]), _u32(b[:, 4:16]), _u32(b[:, :4])])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        q = _nibbles(_bytes(packed, 0, nsb, 128)).astype(np.float32)
        sc, m = _k4_scale_min(_bytes(packed, nsb * 32, nsb, 12))
        dm = packed[nsb * 35: nsb * 36].view(np.float16).astype(np.float32).reshape(nsb, 2)
        d, mn = (dm[:, :1] * sc)[:, :, None], (dm[:, 1:] * m)[:, :, None]
        return (d * q - mn).reshape(rows, k)


class Q5_K(_KQuant):
    # block (176 B): d f16 | dmin f16 | scales u8[12] (as Q4_K) | qh u8[32] | qs u8[128] (as Q4_K)
    #   bit j of qh[l] is bit 4 of element l of group j; value = (d * sc[j]) * q - (dmin * m[j])
    # packed: qs (nsb, 32) u32 | qh (nsb, 8) u32 | scales (nsb, 3) u32 | (d, dmin) (nsb) u32   -- 44 words
    name, ggml_type, block_bytes = "q5_k", T.Q5_K, 176

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 48:]), _u32(b[:, 16:48]), _u32(b[:, 4:16]), _u32(b[:, :4])])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        q = _nibbles(_bytes(packed, 0, nsb, 128)) | (_bit_planes(_bytes(packed, nsb * 32, nsb, 32)) << 4)
        sc, m = _k4_scale_min(_bytes(packed, nsb * 40, nsb, 12))
        dm = packed[nsb * 43: nsb * 44].view(np.float16).astype(np.float32).reshape(nsb, 2)
        d, mn = (dm[:, :1] * sc)[:, :, None], (dm[:, 1:] * m)[:, :, None]
        return (d * q.astype(np.float32) - mn).reshape(rows, k)


class Q6_K(_KQuant):
    # block (210 B): ql u8[128] | qh u8[64] | scales i8[16] (one per 16 elements) | d f16
    #   group j = 4h + r (half h, quarter r): low 4 bits from ql[64h + 32(r % 2) + l], nibble r // 2;
    #   high 2 bits = bits 2r..2r+1 of qh[32h + l]; elements l < 16 use scales[2j], l >= 16 scales[2j + 1];
    #   value = (d * scale) * (q - 32)
    # packed: ql (nsb, 32) u32 | qh (nsb, 16) u32 | scales (nsb, 4) u32 | d (nsb) f16 pairs
    name, ggml_type, block_bytes = "q6_k", T.Q6_K, 210

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, :128]), _u32(b[:, 128:192]), _u32(b[:, 192:208]),
                               _f16_pairs(b[:, 208:].copy().view(np.uint16))])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        ql = _bytes(packed, 0, nsb, 128).reshape(nsb, 2, 1, 2, 32)          # (half, nibble, run, l)
        lo = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(nsb, 2, 4, 32)   # r = 2 * nibble + run
        qh = _bytes(packed, nsb * 32, nsb, 64).reshape(nsb, 2, 1, 32)
        hi = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).reshape(nsb, 16, 16).astype(np.float32)
        sc = _bytes(packed, nsb * 48, nsb, 16).view(np.int8).astype(np.float32)
        d = _scales_from(packed, nsb * 52, nsb)
        return ((d[:, None] * sc)[:, :, None] * q).reshape(rows, k)


class Q2_K(_KQuant):
    # block (84 B): scales u8[16] (low nibble scale, high nibble min, one per 16 elements) | qs u8[64] | d f16 | dmin f16
    #   group j = 4h + s: bits 2s..2s+1 of qs[32h + l]; elements l < 16 use scales[2j], l >= 16 scales[2j + 1];
    #   value = (d * sc) * q - (dmin * m)
    # packed: qs (nsb, 16) u32 | scales (nsb, 4) u32 | (d, dmin) (nsb) u32   -- 21 words, exactly the block
    name, ggml_type, block_bytes = "q2_k", T.Q2_K, 84

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 16:80]), _u32(b[:, :16]), _u32(b[:, 80:])])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        q = _crumbs(_bytes(packed, 0, nsb, 64)).reshape(nsb, 16, 16).astype(np.float32)
        s = _bytes(packed, nsb * 16, nsb, 16)
        dm = packed[nsb * 20: nsb * 21].view(np.float16).astype(np.float32).reshape(nsb, 2)
        d = (dm[:, :1] * (s & 15).astype(np.float32))[:, :, None]
        mn = (dm[:, 1:] * (s >> 4).astype(np.float32))[:, :, None]
        return (d * q - mn).reshape(rows, k)


class Q3_K(_KQuant):
    # block (110 B): hmask u8[32] | qs u8[64] | scales u8[12] (16 x 6-bit) | d f16
    #   group j = 4h + s: low 2 bits = bits 2s..2s+1 of qs[32h + l]; bit j of hmask[l] SET means +0, CLEAR means -4;
    #   scale i (i = 2j + l // 16) = ((b[i % 8] >> 4 (i // 8)) & 15) | ((b[8 + i % 4] >> 2 (i // 4)) & 3) << 4, minus 32;
    #   value = (d * scale) * q
    # packed: qs (nsb, 16) u32 | hmask (nsb, 8) u32 | scales (nsb, 3) u32 | d (nsb) f16 pairs
    name, ggml_type, block_bytes = "q3_k", T.Q3_K, 110

    @classmethod
    def pack(cls, raw, rows, k):
        b = cls.blocks(raw, rows, k)
        return np.concatenate([_u32(b[:, 32:96]), _u32(b[:, :32]), _u32(b[:, 96:108]),
                               _f16_pairs(b[:, 108:].copy().view(np.uint16))])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nsb = rows * k // QK_K
        hm = _bit_planes(_bytes(packed, nsb * 16, nsb, 32))
        q = (_crumbs(_bytes(packed, 0, nsb, 64)).astype(np.int8) - ((hm ^ 1) << 2).astype(np.int8))
        b = _bytes(packed, nsb * 24, nsb, 12)
        i = np.arange(16)
        lo = (b[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 15
        hi = (b[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
        sc = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
        d = _scales_from(packed, nsb * 27, nsb)
        return ((d[:, None] * sc)[:, :, None] * q.reshape(nsb, 16, 16).astype(np.float32)).reshape(rows, k)


# ---- kiln's own schemes: re-quantization targets (`kiln compile --quant`) ---------------------------------------------
# Not GGUF types, so they are not in QuantScheme.registry (which maps GGUF tensor types); KILN_SCHEMES holds them.
# `raw` for these schemes is kiln-defined and row-major (the packer slices it by rows), made by `quantize(floats)`.


class _Q4G(QuantScheme):
    """Symmetric 4-bit integers with one f16 scale per `group` consecutive weights of a row (q4g32, q4g64, q4g128).

    quantize: per group d = f16(max |w| / 7); q = clamp(round(w / d), -8, 7) (0 where d == 0); value = d * q.
    A row of K weights has ceil(K / group) groups; the last one is shorter when K is not a multiple of `group`
    (SmolLM2's K = 576 with group 128), so any K that is a multiple of 32 works.
    raw row (bytes):  qs: K / 32 runs of 16 bytes | d: ceil(K / group) f16
        run j holds weights 32j .. 32j + 31 as q + 8: byte i = weight 32j + i (low nibble), 32j + i + 16 (high nibble)
        -- the nibble order of GGUF's Q4_0, so the kernels read a run exactly like a Q4_0 block.
    packed:  qs (rows * K / 32, 4) u32 | d (rows * ceil(K / group)) f16 pairs
        weight (r, c): run r * K/32 + c // 32; scale r * ceil(K / group) + c // group.
    """
    group: ClassVar[int]
    block_size = 32          # kernels' granularity: K must be a multiple of 32

    @classmethod
    def groups_per_row(cls, k: int) -> int:
        return -(-k // cls.group)

    @classmethod
    def row_bytes(cls, k: int) -> int:
        return k // 2 + 2 * cls.groups_per_row(k)

    @classmethod
    def quantize(cls, w: np.ndarray) -> np.ndarray:
        """(rows, K) floats -> raw uint8 (rows * row_bytes(K),)."""
        w = np.asarray(w, np.float32)
        rows, k = w.shape
        if k % GROUP:
            raise UnsupportedModelError(f"row length {k} is not a multiple of {GROUP}")
        ng = cls.groups_per_row(k)
        pad = np.zeros((rows, ng * cls.group), np.float32)
        pad[:, :k] = w
        g = pad.reshape(rows, ng, cls.group)
        d = (np.abs(g).max(axis=2) / np.float32(7)).astype(np.float16)
        df = d.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(df > 0, np.clip(np.round(g / df), -8, 7), 0).astype(np.int8)
        u = (q.reshape(rows, -1)[:, :k] + 8).astype(np.uint8).reshape(rows, k // 32, 2, 16)
        qs = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(rows, k // 2)
        return np.concatenate([qs, d.view(np.uint8).reshape(rows, 2 * ng)], axis=1).reshape(-1)

    @classmethod
    def pack(cls, raw, rows, k):
        b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cls.row_bytes(k))
        return np.concatenate([_u32(b[:, :k // 2]), _f16_pairs(b[:, k // 2:].copy().view(np.uint16))])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb, ng = rows * k // 32, cls.groups_per_row(k)
        qs = packed[: nb * 4].view(np.uint8).reshape(nb, 16)
        q = (np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - 8).reshape(rows, k)
        d = _scales_from(packed, nb * 4, rows * ng).reshape(rows, ng)
        return q * np.repeat(d, cls.group, axis=1)[:, :k]

    @classmethod
    def packed_words(cls, rows, k):
        return rows * k // 8 + -(-rows * cls.groups_per_row(k) // 2)


class Q4G32(_Q4G):
    name, group = "q4g32", 32


class Q4G64(_Q4G):
    name, group = "q4g64", 64


class Q4G128(_Q4G):
    name, group = "q4g128", 128


KILN_SCHEMES: dict[str, type[QuantScheme]] = {s.name: s for s in (Q4G32, Q4G64, Q4G128)}
REQUANT_SOURCES = (T.F32, T.F16, T.Q8_0)   # matrix types `--quant` re-quantizes (lower-bit types stay as they are)
REQUANT_TARGETS = ("q8_0", *KILN_SCHEMES)


def requant_scheme(name: str) -> type[QuantScheme]:
    """The scheme `kiln compile --quant NAME` re-quantizes into."""
    if name == "q8_0":
        return Q8_0
    if name in KILN_SCHEMES:
        return KILN_SCHEMES[name]
    raise UnsupportedModelError(f"unknown --quant scheme {name!r} (choose from {', '.join(REQUANT_TARGETS)})")


def requantize(scheme: type[QuantScheme], w: np.ndarray) -> np.ndarray:
    """(rows, K) float32 -> the raw bytes `scheme.pack` takes."""
    if scheme is Q8_0:
        from gguf.quants import quantize
        return np.ascontiguousarray(quantize(np.asarray(w, np.float32), T.Q8_0)).view(np.uint8).reshape(-1)
    return scheme.quantize(w)


def scheme_named(name: str) -> type[QuantScheme]:
    """Any scheme by its manifest name: a GGUF type's or kiln's own."""
    return QuantScheme.registry.get(name) or KILN_SCHEMES[name]


def scheme_for(ggml_type: T) -> type[QuantScheme]:
    for s in QuantScheme.registry.values():
        if s.ggml_type == ggml_type:
            return s
    supported = ", ".join(sorted(s.ggml_type.name for s in QuantScheme.registry.values()))
    raise UnsupportedModelError(f"tensor type {ggml_type.name} is not supported (supported: {supported})")

"""kiln's own schemes, re-quantization targets (`kiln compile --quant`): q4g32, q4g64, q4g128.

Not GGUF types (ggml_type None). Their `raw` bytes are kiln-defined and row-major (the packer slices them by rows),
made by `quantize(floats)`; requant.py picks the scheme and runs it.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import UnsupportedModelError
from .scheme import GROUP, QuantScheme, Region, f16_pairs, halves_from, u32


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
    A "block" here is a 32-weight run; the d region holds one f16 per *group* of a row, not per block.
    """
    ggml_type = None
    group: ClassVar[int]
    block_size = 32          # kernels' granularity: K must be a multiple of 32
    regions = (Region("qs", 0, 16), Region("d", 0, 0, halves=True))   # d: see region_words

    @classmethod
    def groups_per_row(cls, k: int) -> int:
        return -(-k // cls.group)

    @classmethod
    def row_bytes(cls, k: int) -> int:
        return k // 2 + 2 * cls.groups_per_row(k)

    @classmethod
    def region_words(cls, r, rows, k):
        if r.name == "d":
            return -(-rows * cls.groups_per_row(k) // 2)
        return super().region_words(r, rows, k)

    @classmethod
    def layout(cls):
        return {**super().layout(), "group": cls.group}

    @classmethod
    def reader(cls):
        return "_quant_q4g.wgsl.j2"   # one reader for every group size

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
        cls.check_k(k)
        b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cls.row_bytes(k))
        return np.concatenate([u32(b[:, :k // 2]), f16_pairs(b[:, k // 2:].copy().view(np.uint16))])

    @classmethod
    def dequantize_packed(cls, packed, rows, k):
        nb, ng = cls.n_blocks(rows, k), cls.groups_per_row(k)
        qs = packed[: nb * 4].view(np.uint8).reshape(nb, 16)
        q = (np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - 8).reshape(rows, k)
        d = halves_from(packed, cls.offset("d", nb), rows * ng).reshape(rows, ng)
        return q * np.repeat(d, cls.group, axis=1)[:, :k]


class Q4G32(_Q4G):
    name, group = "q4g32", 32


class Q4G64(_Q4G):
    name, group = "q4g64", 64


class Q4G128(_Q4G):
    name, group = "q4g128", 128
